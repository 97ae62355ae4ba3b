"""Connector alignment pretraining (LLaVA stage 1) on a tiny random Llama: only the connector trains, the held-out
caption loss goes down, the report carries before/after/chance numbers, and a killed run resumes to the same weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from distillrec.data.synthetic import make_demo_shop  # noqa: E402
from distillrec.data.item_text import keyword_sets, split_item_text, words  # noqa: E402
from distillrec.llm.multimodal import MultimodalLM  # noqa: E402
from distillrec.methods.connector_alignment.config import AlignmentConfig  # noqa: E402
from distillrec.methods.connector_alignment.data import keyword_scores  # noqa: E402
from distillrec.methods.connector_alignment.pipeline import main, pretrain_connector  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def shop():
    return make_demo_shop(n_items=96, n_users=10, seed=3, write_images=False)


def cfg(tmp_path, name="run", **kw):
    base = dict(
        dataset={"name": "demo"}, image_feature="attributes_onehot", lm="tiny", progress=False,
        multimodal={"n_query": 2, "qformer_dim": 32, "qformer_layers": 1, "qformer_heads": 2},
        epochs=3, lr=1e-2, batch_size=16, max_items=64, max_heldout=16, heldout_frac=0.2, warmup_steps=1,
        target_template="{colour} {category}", keyword_fields=["category", "colour"], max_answer_tokens=12,
        max_new_tokens=4, seed=5, out=str(tmp_path / name),
    )
    base.update(kw)
    return AlignmentConfig(**base)


def test_connector_is_the_only_thing_that_trains_and_loss_goes_down(tmp_path, shop):
    r = pretrain_connector(cfg(tmp_path), dataset=shop)
    assert r["lm_unchanged"] is True
    assert r["trainable_parameters"] > 0
    assert r["after"]["caption_loss"] < r["before"]["caption_loss"] - 0.05
    assert [h["epoch"] for h in r["history"]] == [1, 2, 3]
    for part in ("before", "after"):
        for key in ("caption_loss", "caption_ppl", "keyword_recall", "chance", "p_value", "n_keyword_items"):
            assert key in r[part], (part, key)
        assert 0.0 <= r[part]["keyword_recall"] <= 1.0 and 0.0 <= r[part]["chance"] <= 1.0
    assert r["n_heldout"] == 16 and r["n_train"] == 64
    assert len(set(r["heldout_items"])) == 16
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["after"]["caption_loss"] == pytest.approx(r["after"]["caption_loss"])
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| before |" in md and "| after |" in md and "chance" in md
    assert (tmp_path / "run" / "connector" / "connector.safetensors").is_file()


def test_resume_after_a_kill_gives_the_same_connector(tmp_path, shop):
    from safetensors.torch import load_file

    full = pretrain_connector(cfg(tmp_path, "full"), dataset=shop)
    c = cfg(tmp_path, "killed", save_every=3)  # 4 steps per epoch, 3 epochs
    calls = {"n": 0}
    real = MultimodalLM.lm_loss

    def dying(self, *a, **k):
        if k.get("reduction", "mean") == "mean":  # a training step (evaluation sums)
            calls["n"] += 1
            if calls["n"] == 11:  # step 11 of 12: the last checkpoint is step 9
                raise KeyboardInterrupt
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MultimodalLM, "lm_loss", dying)
        with pytest.raises(KeyboardInterrupt):
            pretrain_connector(c, dataset=shop)
    ck = tmp_path / "killed" / "train" / "checkpoint"
    assert (ck / "stage.json").is_file() and not (tmp_path / "killed" / "connector").exists()
    resumed = pretrain_connector(c, dataset=shop)
    assert resumed["resumed_from"].endswith("checkpoint")
    a = load_file(str(tmp_path / "full" / "connector" / "connector.safetensors"))
    b = load_file(str(tmp_path / "killed" / "connector" / "connector.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["after"]["caption_loss"] == pytest.approx(full["after"]["caption_loss"], abs=1e-6)
    assert resumed["before"] == full["before"]
    # another config in the same folder is refused
    (ck / "stage.json").parent.mkdir(parents=True)  # a checkpoint of the old config in the folder
    (ck / "stage.json").write_text("{}")
    with pytest.raises(ValueError, match="another alignment config"):
        pretrain_connector(cfg(tmp_path, "killed", lr=5e-3), dataset=shop)


def test_keyword_metrics_by_hand():
    kw = [{"shoe"}, {"mug"}, {"kettle"}]
    s = keyword_scores(["red shoes", "a mug", "shoes again"], kw, n_perm=200)
    assert s["recall"] == pytest.approx(2 / 3)
    # gen0 vs others: mug no, kettle no; gen1: shoe no, kettle no; gen2: shoe yes, mug no -> (0 + 0 + 1/2) / 3
    assert s["chance"] == pytest.approx(1 / 6)
    assert 0 < s["p_value"] <= 1
    assert words("The Red Running-Shoes, 2 pack") == {"red", "running", "shoe"}
    sets, common = keyword_sets([{"c": "Industrial & Scientific Tapes"}, {"c": "Industrial & Scientific Lab"}],
                                ["c"], 0.5)
    assert common == ["industrial", "scientific"] and sets == [{"tape"}, {"lab"}]
    assert split_item_text("A. B title. Industrial & Scientific Tapes. Gorilla. ") == {
        "title": "A. B title", "categories": "Industrial & Scientific Tapes", "brand": "Gorilla"}


def test_config_is_strict_and_cli_main_runs(tmp_path):
    with pytest.raises(ValueError):
        AlignmentConfig(dataset={"name": "demo"}, epochz=2)
    with pytest.raises(ValueError):
        AlignmentConfig(dataset={"name": "demo"}, multimodal={"n_querry": 4})
    with pytest.raises(ValueError):
        AlignmentConfig(dataset={"name": "demo"}, prompt="no image slot")
    y = tmp_path / "a.yaml"
    y.write_text(
        "dataset: {name: demo, options: {n_items: 48, n_users: 5, seed: 1, write_images: false}}\n"
        "image_feature: attributes_onehot\nlm: tiny\nprogress: false\nmultimodal: {n_query: 2, qformer_dim: 16, qformer_layers: 1, "
        "qformer_heads: 2}\nepochs: 1\nmax_items: 24\nmax_heldout: 6\nmax_new_tokens: 2\n"
        "target_template: '{category}'\n")
    r = main(y, ["batch_size=12"], out=tmp_path / "cli")
    assert r["config"]["batch_size"] == 12 and r["n_train"] == 24
    assert (tmp_path / "cli" / "report.md").is_file()
