"""Peak memory per phase: each phase reports its own peak, and the whole-process peak survives the resets."""

import sys

import numpy as np
import pytest

from distillrec import resources


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-phase peaks need Linux's clear_refs")
def test_each_phase_reports_its_own_peak_and_the_process_peak_survives():
    peaks = resources.PhasePeaks()
    with peaks.phase("big"):
        block = np.ones(300 * 2**20 // 8)  # 300 MB, touched
        del block
    with peaks.phase("small"):
        np.ones(2**20).sum()
    d = peaks.as_dict()
    assert d["per_phase"] is True
    assert d["big"] - d["small"] > 250
    assert resources.peak_rss_mb() >= d["big"] - 0.05  # the phase value is rounded to 0.1 MB


def test_a_run_reports_peak_memory_by_phase(tmp_path, tiny_demo_config):
    from distillrec.runs import load_config
    from distillrec.training.trainer import run

    cfg = load_config({"model": {"name": "gru4rec", "params": {"embedding_size": 16, "hidden_size": 16}},
                       "dataset": tiny_demo_config, "train": {"epochs": 1, "seeds": [1], "progress": False}})
    t = run(cfg, tmp_path / "run")["timing"]
    by_phase = t["peak_rss_mb_by_phase"]
    assert set(by_phase) == {"load", "train", "evaluate", "per_phase"}
    assert all(0 < by_phase[k] <= t["peak_rss_mb"] for k in ("load", "train", "evaluate"))


def test_the_thread_count_does_not_change_a_training_result(tmp_path, tiny_demo_config):
    # config.auto_threads picks 1 or 2 threads by machine load: that must never change a number
    import torch

    from distillrec.runs import load_config
    from distillrec.training.trainer import run

    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            cfg = load_config({"model": {"name": "sasrec", "params": {"hidden_size": 32, "inner_size": 64}},
                               "dataset": tiny_demo_config,
                               "train": {"epochs": 2, "seeds": [1], "progress": False, "num_threads": threads}})
            m = run(cfg, tmp_path / f"t{threads}")
            results.append((m["test"], m["seeds"][0]["history"][-1]["train_loss"]))
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[1]
