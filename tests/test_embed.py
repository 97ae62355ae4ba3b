"""``distillrec embed``: shapes and id map, length-sorted resumable shards, torchrun with 2 ranks equal to 1 process.
All on the tiny random Llama (``lm: {name: tiny}``, deterministic by seed) and a small demo shop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("peft")

from distillrec.llm import MultimodalLM  # noqa: E402
from distillrec.training.embed import (  # noqa: E402
    EMBEDDINGS_FILE,
    build_model,
    effective_multimodal_config,
    embed_items,
    load_embed_config,
    load_item_embeddings,
    prompt_lengths,
    shard_path,
)
from distillrec.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

N_ITEMS = 60
CFG = {
    "dataset": {"name": "demo", "options": {"n_items": N_ITEMS, "n_users": 20, "seed": 1, "write_images": False}},
    "lm": {"name": "tiny", "seed": 0},
    "multimodal": {"n_query": 2, "qformer_dim": 32, "lora_r": 4, "lora_dropout": 0.0},
    "image_features": "attributes_onehot",  # 52-d one-hot stand-in for image features (d_image follows it)
    "batch_size": 8,
    "shard_size": 16,  # 4 shards: 16, 16, 16, 12
    "num_threads": 1,
    "progress": False,
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("embed") / "single"
    result = embed_items(load_embed_config(CFG), out)
    return out, result


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'batchsize'"):
        load_embed_config(CFG | {"batchsize": 4})
    with pytest.raises(ConfigError, match="unknown key 'lm.nme'"):
        load_embed_config(CFG | {"lm": {"nme": "tiny"}})
    with pytest.raises(ConfigError, match="either 'pretrained'"):
        load_embed_config(CFG | {"pretrained": "somewhere"})
    cfg = load_embed_config(CFG, ["adapter=nope", "image_features=null"])
    with pytest.raises(ConfigError, match="adapter 'nope'"):
        build_model(cfg, effective_multimodal_config(cfg, None))


def test_cli_reports_a_missing_feature_cleanly(tmp_path):
    from typer.testing import CliRunner

    from distillrec.cli import app

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CFG | {"image_features": "image_clip"}))
    result = CliRunner().invoke(app, ["embed", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no feature matrix 'image_clip'" in result.output and "Traceback" not in result.output


def test_output_shapes_id_map_rows_and_sorted_shards(baseline):
    out, result = baseline
    assert result["computed_shards"] == 4 and result["dims"] == {"image": 64, "text": 64}
    emb, ids, meta = load_item_embeddings(out)
    assert emb["image"].shape == emb["text"].shape == (N_ITEMS + 1, 64)
    assert emb["image"].dtype == torch.float32
    assert not emb["image"][0].any() and not emb["text"][0].any()  # row 0 = padding
    assert ids[0] is None and ids[1:] == [f"item{i:05d}" for i in range(1, N_ITEMS + 1)]
    assert meta["model"] == "tiny" and meta["adapter"] == "knowledge" and meta["n_items"] == N_ITEMS
    assert meta["dims"] == {"image": 64, "text": 64} and len(meta["config_hash"]) == 20
    # every item's text embedding is its own; the image one (at <IMG_SUM>, which sees only the instruction and the
    # image tokens) differs exactly between items whose image features differ
    assert torch.cdist(emb["text"][1:], emb["text"][1:]).fill_diagonal_(1.0).min() > 0
    from distillrec.data.loaders import load_dataset

    cfg = load_embed_config(CFG)
    items = load_dataset(cfg.dataset).items
    feats = torch.from_numpy(items.features["attributes_onehot"])
    same_feat = torch.cdist(feats[1:], feats[1:]) == 0
    dist = torch.cdist(emb["image"][1:], emb["image"][1:], compute_mode="donot_use_mm_for_euclid_dist")
    assert (dist[~same_feat] > 1e-3).all() and (dist[same_feat] < 1e-4).all()

    # row i is internal item i: recompute a few items one at a time, directly with the model
    mm = build_model(cfg, effective_multimodal_config(cfg, feats.shape[1]))
    with torch.no_grad():
        for i in (1, 17, N_ITEMS):
            e = mm.embed([items.item_text(i)], image_features=feats[i:i + 1], adapter="knowledge")
            assert torch.allclose(e["text"][0], emb["text"][i], atol=1e-5)
            assert torch.allclose(e["image"][0], emb["image"][i], atol=1e-5)

    # shards hold the items longest prompt first
    lengths = prompt_lengths(mm, [items.item_text(i) for i in range(1, N_ITEMS + 1)], np.ones(N_ITEMS, bool))
    from safetensors.torch import load_file

    order = np.concatenate([load_file(str(shard_path(out, k)))["items"].numpy() for k in range(4)])
    assert sorted(order.tolist()) == list(range(1, N_ITEMS + 1))
    assert (np.diff(lengths[order - 1]) <= 0).all()


def test_resume_recomputes_only_the_missing_shard(baseline, tmp_path, monkeypatch):
    src, _ = baseline
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    before = load_item_embeddings(out)[0]
    mtimes = {k: shard_path(out, k).stat().st_mtime_ns for k in range(4)}
    shard_path(out, 2).unlink()
    (out / EMBEDDINGS_FILE).unlink()

    calls: list[int] = []
    real = MultimodalLM.embed

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(MultimodalLM, "embed", counting)
    result = embed_items(load_embed_config(CFG), out)
    assert result["computed_shards"] == 1 and result["reused_shards"] == 3
    assert sum(calls) == 16  # shard 2 only, in batches of batch_size
    assert calls == [8, 8]
    for k in (0, 1, 3):
        assert shard_path(out, k).stat().st_mtime_ns == mtimes[k]
    after = load_item_embeddings(out)[0]
    for key in ("image", "text"):
        assert torch.equal(before[key], after[key])

    # a finished output is up to date: nothing runs; a stale shard (other config) is recomputed, not reused
    calls.clear()
    assert embed_items(load_embed_config(CFG), out)["up_to_date"] and not calls
    # a smaller batch size is not part of the hash: a run that ran out of memory resumes with a smaller batch
    (out / EMBEDDINGS_FILE).unlink()
    shard_path(out, 0).unlink()
    result = embed_items(load_embed_config(CFG, ["batch_size=4"]), out)
    assert result["computed_shards"] == 1 and calls == [4, 4, 4, 4]
    calls.clear()
    result = embed_items(load_embed_config(CFG, ["adapter=base", "lm.seed=1"]), out)
    assert result["computed_shards"] == 4 and sum(calls) == N_ITEMS


def test_two_processes_under_torchrun_equal_one_process(baseline, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    src, _ = baseline
    cfg_path = tmp_path / "embed.yaml"
    cfg_path.write_text(yaml.safe_dump(CFG))
    out = tmp_path / "ddp"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_PORT": "29547"}
    proc = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", "29547", "-m", "distillrec", "embed", str(cfg_path),
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["computed_shards"] == 2  # rank 0: shards 0 and 2
    one, ids1, meta1 = load_item_embeddings(src)
    two, ids2, meta2 = load_item_embeddings(out)
    assert ids1 == ids2 and meta1["config_hash"] == meta2["config_hash"]
    for key in ("image", "text"):
        assert (one[key] - two[key]).abs().max().item() <= 1e-5

