"""benchmarks/tpad_speed.py on a tiny TPAD run (tiny LM, 90-item demo shop) and a tiny fused SASRec on its features."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from distillrec.methods.tpad import pipeline as tpad  # noqa: E402
from distillrec.methods.tpad.config import TPADConfig  # noqa: E402
from distillrec.runs import load_config  # noqa: E402
from distillrec.training.trainer import run  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tpad_speed.py"
DEMO = {"name": "demo", "options": {"n_items": 90, "n_users": 160, "write_images": False}}


def _bench():
    spec = importlib.util.spec_from_file_location("tpad_speed", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpad_speed")
    out = root / "tpad"
    cfg = TPADConfig(**{
        "dataset": DEMO,
        "lm": {"name": "tiny", "seed": 0},
        "device": "cpu",
        "multimodal": {"connector": "mlp"},
        "image_features": "attributes_onehot",
        "text_fields": ["title", "category"],
        "text_view": None,
        "keywords": {"fields": ["category", "brand", "colour"]},
        "knowledge": {"epochs": 1, "batch_size": 8, "max_items": 16, "gr_items": 0},
        "transfer": {"epochs": 1, "batch_size": 8, "max_items": 16},
        "align": {"epochs": 1, "batch_size": 8, "max_items": 16},
        "embed_batch_size": 16,
        "save_every": 100,
        "progress": False,
        "out": str(out),
    })
    tpad.run_tpad(cfg, log=lambda s: None)
    dcfg = load_config({
        "model": {"name": "fused_sasrec", "params": {"features": ["tpad_image", "tpad_text"], "hidden_size": 16,
                                                      "inner_size": 32, "n_layers": 1, "max_len": 20}},
        "dataset": {**DEMO, "embeddings": {"tpad": str(out / "embeddings")}},
        "train": {"epochs": 1, "batch_size": 64, "max_len": 20, "seeds": [3], "progress": False},
    })
    run(dcfg, root / "down")
    return out, root / "down", root


def test_benchmark_measures_both_sides_and_writes_its_tables(runs):
    tpad_out, down, root = runs
    bench = _bench()
    prefix = root / "result" / "speed"
    r = bench.main(["--tpad-run", str(tpad_out), "--downstream-run", str(down), "--sessions", "4",
                    "--llm-sessions", "1", "--llm-batch", "32", "--threads", "1", "--out", str(prefix)])
    assert r["items"] == 90 and r["lm"] == "tiny" and r["lm_layers"] == 2 and r["threads"] == 1
    assert r["embedding"]["seconds"] > 0 and r["embedding"]["items_per_s"] > 0
    # the timed Knowledge tower is the one that wrote the run's embeddings
    assert r["embedding"]["max_abs_diff_vs_stored"] < 1e-4
    d, m = r["downstream"], r["llm"]
    assert d["sessions"] == 4 and len(d["ms"]) == 4 and all(t > 0 for t in d["ms"])
    assert d["p90_ms"] >= d["median_ms"] > 0
    assert m["sessions"] == 1 and m["median_s"] > 0 and m["per_candidate_ms"] > 0
    assert m["scores_per_session"] == 90  # every catalogue item was scored
    assert r["ratio_llm_over_tpad"] > 0 and r["amortised"]["ratio_llm_over_tpad"] > 0
    assert r["ratio_llm_over_tpad"] == pytest.approx(m["median_s"] / (d["median_ms"] / 1000))
    assert r["downstream_features"] == ["tpad_image", "tpad_text"] and not r["notes"]
    md = Path(f"{prefix}.md").read_text()
    assert "--llm-sessions 1" in md and "has no KV cache" in md and "| 90 | tiny (2) | 1 |" in md
    js = json.loads(Path(f"{prefix}.json").read_text())
    assert js["llm"]["kv_cache_of_session_prefix"] is False and js["session_rows"] == r["session_rows"]
    # the KV-cached scorer: same scores, fewer tokens through the LM per candidate, its own ratios
    k = js["llm_kv"]
    assert k["kv_cache_of_session_prefix"] is True and k["scores_per_session"] == 90
    assert js["kv_max_abs_score_diff"] < 1e-4 and k["mean_prefix_tokens"] > 0
    assert k["mean_prompt_tokens"] < m["mean_prompt_tokens"]
    assert r["ratio_llm_kv_over_tpad"] == pytest.approx(k["median_s"] / (d["median_ms"] / 1000))
    assert "KV-cached" in md


def test_llm_scorer_scores_every_item_independently_of_the_batch(runs):
    tpad_out, down, _ = runs
    bench = _bench()
    torch.set_num_threads(1)
    cfg, ds, mm, texts, image, has_image = bench.load_tpad(tpad_out, "cpu")
    session = ds.test.histories[0]
    stats: dict = {}
    a = bench.llm_session_scores(mm, ds, texts, image, has_image, session, batch_size=32, stats=stats)
    assert a.shape == (ds.n_items + 1,) and a[0] == -math.inf
    assert torch.isfinite(a[1:]).all() and stats["candidates"] == ds.n_items
    assert a[1:].std() > 0  # candidates differ, so do their scores
    # left padding and batch order must not change a candidate's score
    order = bench.embedding_order(mm, texts, has_image)
    b = bench.llm_session_scores(mm, ds, texts, image, has_image, session, batch_size=7, order=order)
    assert torch.allclose(a[1:], b[1:], atol=1e-4)
    # the session-prefix KV cache gives the same scores, running fewer tokens through the LM
    kv_stats: dict = {}
    k = bench.llm_session_scores(mm, ds, texts, image, has_image, session, batch_size=7, order=order, kv_cache=True,
                                 stats=kv_stats)
    assert torch.allclose(a[1:], k[1:], atol=1e-4)
    assert kv_stats["prefix_tokens"] > 10 and kv_stats["tokens"] < stats["tokens"]
    # the session matters: another context gives other scores
    c = bench.llm_session_scores(mm, ds, texts, image, has_image, ds.test.histories[5], batch_size=32)
    assert not torch.allclose(a[1:], c[1:])
    # one prompt per candidate, holding the last 5 session titles and the question
    names = bench.session_names(ds, session, 5, texts)
    assert len(names) == min(5, len(session))
    p = bench.candidate_prompts(mm, names, texts, np.array([1]))[0]
    assert names[-1] in p and p.endswith(bench.QUESTION) and texts[1] in p
