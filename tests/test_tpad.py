"""TPAD: keyword targets, meta pairs, heads, the staged run (tiny LM), resume, ablation switches, embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from distillrec.data.dataset import DataError  # noqa: E402
from distillrec.data.embeddings import attach_item_embeddings  # noqa: E402
from distillrec.data.loaders import load_dataset  # noqa: E402
from distillrec.methods.tpad import keywords as kw  # noqa: E402
from distillrec.methods.tpad.model import (  # noqa: E402
    TransitionalPatternAlignment,
    ViewContrast,
    contrastive_loss,
    meta_pairs,
    similarity_distillation,
)
from distillrec.methods.tpad import pipeline as tpad  # noqa: E402
from distillrec.methods.tpad.config import TPADConfig  # noqa: E402
from distillrec.methods.tpad.pipeline import run_tpad  # noqa: E402

DEMO = {"name": "demo", "options": {"n_items": 90, "n_users": 160, "write_images": False}}


@pytest.fixture(scope="module")
def demo():
    return load_dataset(DEMO)


def tiny_cfg(out, **kw_):
    base = {
        "dataset": DEMO,
        "lm": {"name": "tiny", "seed": 0},
        "multimodal": {"connector": "mlp"},
        "image_features": "attributes_onehot",
        "text_fields": ["title", "category"],
        "text_view": None,
        "keywords": {"fields": ["category", "brand", "colour"]},
        "knowledge": {"epochs": 1, "batch_size": 8, "max_items": 32, "gr_items": 6, "gr_max_new_tokens": 4},
        "transfer": {"epochs": 1, "batch_size": 8, "max_items": 32},
        "align": {"epochs": 1, "batch_size": 8, "max_items": 32},
        "embed_batch_size": 16,
        "save_every": 1,
        "progress": False,
        "out": str(out),
    }
    for k, v in kw_.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return TPADConfig(**base)


# ------------------------------------------------------------------------------------------------------- keywords
def test_keyword_answers_come_from_metadata(demo):
    t = kw.keyword_targets(demo, kw.KeywordConfig(fields=["category", "brand", "colour"], title_terms=0))
    for i in (1, 2, 3):
        cat, brand = demo.items.text["category"][i - 1], demo.items.text["brand"][i - 1]
        assert t.answers[i].endswith(f"Category: {cat}")
        assert kw.ordered_words(brand)[0] in t.keywords[i]
    assert t.answers[0] == ""


def test_common_words_are_not_keywords(demo):
    demo2 = load_dataset(DEMO)
    demo2.items.text["colour"] = ["violet"] * demo2.n_items  # in every item: says nothing
    t = kw.keyword_targets(demo2, kw.KeywordConfig(fields=["colour", "category"], max_df=0.5))
    assert all("violet" not in k for k in t.keywords[1:])
    assert any("not keywords" in n for n in t.notes)


def test_keyword_file_json_and_tsv(tmp_path, demo):
    a, b = demo.items.ids[0], demo.items.ids[1]
    js = tmp_path / "k.json"
    js.write_text(json.dumps({a: ["Red Shoes", "running"], "unknown-id": ["x"]}))
    t = kw.keyword_targets(demo, kw.KeywordConfig(source="file", file=str(js)))
    assert t.keywords[1] == ["red", "shoe", "running"]
    assert t.keywords[2] == []
    tsv = tmp_path / "k.tsv"
    tsv.write_text(f"{b}\tglass, beaker\n")
    assert kw.keyword_targets(demo, kw.KeywordConfig(source="file", file=str(tsv))).keywords[2] == ["glass", "beaker"]
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{a} no tab here\n")
    with pytest.raises(DataError, match=r"bad.tsv, line 1"):
        kw.keyword_targets(demo, kw.KeywordConfig(source="file", file=str(bad)))
    with pytest.raises(DataError, match="does not exist"):
        kw.keyword_targets(demo, kw.KeywordConfig(source="file", file=str(tmp_path / "none.json")))
    with pytest.raises(DataError, match="keywords.fields"):
        kw.keyword_targets(demo, kw.KeywordConfig(fields=["nope"]))


def test_generation_rate_by_hand():
    gens = ["Keywords: red shoes, nike", "nothing useful", "anything"]
    targets = [{"red", "shoe", "adidas", "running"}, {"cup"}, set()]
    # item 1: red + shoe of 4 = 0.5; item 2: 0; item 3 has no targets and is left out
    assert kw.generation_rate(gens, targets) == pytest.approx(0.25)
    assert kw.generation_rate(["x"], [set()]) is None


# -------------------------------------------------------------------------------------------------- pairs, heads
def test_meta_pairs_by_hand():
    pairs, ctx = meta_pairs([np.array([1, 2, 3, 2])], max_order=2, context_items=1)
    assert pairs.tolist() == [[1, 2, 1], [2, 3, 1], [3, 2, 1], [1, 3, 2]]  # (2, 2) at k=2 is skipped
    assert ctx == [[], [1], [2], []]
    only_last, none = meta_pairs([np.array([5, 6, 7, 8])], max_order=1, max_len=2)
    assert only_last.tolist() == [[7, 8, 1]] and none is None


def test_contrastive_loss_prefers_matching_rows_and_masks_duplicates():
    torch.manual_seed(0)
    a = torch.randn(6, 8)
    assert contrastive_loss(a, a, 0.1) < contrastive_loss(a, torch.randn(6, 8), 0.1)
    b = a.clone()
    b[1] = a[0]  # rows 0 and 1 hold the same item: row 0 must not be pushed away from b[1]
    items = torch.tensor([3, 3, 4, 5, 6, 7])
    same = items.unsqueeze(0) == items.unsqueeze(1)
    assert contrastive_loss(a, b, 0.1, same) < contrastive_loss(a, b, 0.1)


def test_view_contrast_ignores_invalid_rows():
    torch.manual_seed(0)
    head = ViewContrast(8, 4, 8)
    s, v = torch.randn(5, 8), torch.randn(5, 4)
    valid = torch.tensor([True, True, False, True, False])
    assert torch.allclose(head(s, v, valid), head(s[valid], v[valid]))
    assert float(head(s, v, torch.tensor([True, False, False, False, False]))) == 0.0


def test_estimator_update_leaves_projectors_alone_and_lowers_its_loss():
    torch.manual_seed(0)
    tpa = TransitionalPatternAlignment(16, 12, d_proj=8, estimator_hidden=16)
    h, t = torch.randn(64, 16), torch.randn(64, 12)
    t = t + 0.0
    opt = torch.optim.Adam(tpa.estimator_parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        hh, hl, tt = tpa.project(h, t)
        loss = tpa.estimator_loss(hh, hl, tt)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in tpa.projector_parameters())
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss) < first
    out = tpa(*tpa.project(h, t))
    out["club"].backward()
    assert any(p.grad is not None for p in tpa.D_H.parameters())
    assert all(p.grad is None for p in tpa.D_L.parameters())  # CLUB reads D_H only


# ------------------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tpad")
    cfg = tiny_cfg(out)
    report = tpad.run_tpad(cfg, log=lambda s: None)
    return cfg, report, out


def test_run_writes_embeddings_report_and_gr_per_modality(full_run, demo):
    cfg, report, out = full_run
    from safetensors.torch import load_file

    emb = load_file(str(out / "embeddings" / "item_embeddings.safetensors"))
    assert emb["image"].shape == emb["text"].shape == (demo.n_items + 1, 64)
    assert torch.all(emb["text"][0] == 0) and emb["text"][1:].abs().sum(1).gt(0).all()
    hist = report["stages"]["knowledge"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert {"gr_both", "gr_image", "gr_text"} <= set(hist[1])
    assert {"club", "mine", "gen"} <= set(report["stages"]["align"]["history"][-1])
    assert "Stage 2b" in (out / "report.md").read_text()


def test_each_stage_trains_only_its_tower(full_run):
    from safetensors.torch import load_file

    _, _, out = full_run
    k1 = load_file(str(out / "knowledge" / "final" / "lora_knowledge.safetensors"))
    t1 = load_file(str(out / "knowledge" / "final" / "lora_transfer.safetensors"))
    k2 = load_file(str(out / "transfer" / "final" / "lora_knowledge.safetensors"))
    t2 = load_file(str(out / "transfer" / "final" / "lora_transfer.safetensors"))
    k3 = load_file(str(out / "align" / "final" / "lora_knowledge.safetensors"))
    t3 = load_file(str(out / "align" / "final" / "lora_transfer.safetensors"))
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(k1, k2) and not same(t1, t2)  # 2a: transfer tower only
    assert same(t2, t3) and not same(k2, k3)  # 2b: transfer frozen, knowledge continues
    c1 = load_file(str(out / "knowledge" / "final" / "connector.safetensors"))
    c2 = load_file(str(out / "transfer" / "final" / "connector.safetensors"))
    assert same(c1, c2)


def test_finished_run_is_not_redone(full_run):
    cfg, report, out = full_run
    before = (out / "align" / "final" / "stage.json").stat().st_mtime_ns
    again = tpad.run_tpad(cfg, stages=["align"], log=lambda s: None)
    assert (out / "align" / "final" / "stage.json").stat().st_mtime_ns == before
    assert again["stages"]["align"]["history"] == report["stages"]["align"]["history"]


def test_kill_and_resume_gives_the_same_embeddings(full_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _, _, ref_out = full_run
    cfg = tiny_cfg(tmp_path / "killed")
    calls = {"n": 0}
    real = tpad._drop_modalities

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # stage 2b's third step (stage 1 has 4 steps; 2a draws none)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tpad, "_drop_modalities", dying)
    with pytest.raises(KeyboardInterrupt):
        tpad.run_tpad(cfg, log=lambda s: None)
    monkeypatch.setattr(tpad, "_drop_modalities", real)
    assert (tmp_path / "killed" / "knowledge" / "final").is_dir()
    tpad.run_tpad(cfg, log=lambda s: None)
    a = load_file(str(ref_out / "embeddings" / "item_embeddings.safetensors"))
    b = load_file(str(tmp_path / "killed" / "embeddings" / "item_embeddings.safetensors"))
    assert torch.allclose(a["text"], b["text"], atol=1e-6) and torch.allclose(a["image"], b["image"], atol=1e-6)


def test_changed_config_in_same_folder_is_an_error(full_run, tmp_path):
    cfg = tiny_cfg(tmp_path / "x", knowledge={"epochs": 2})
    (tmp_path / "x" / "knowledge" / "checkpoint").mkdir(parents=True)
    (tmp_path / "x" / "knowledge" / "checkpoint" / "stage.json").write_text(json.dumps({"key": "other"}))
    with pytest.raises(tpad.ConfigError, match="another knowledge config"):
        tpad.run_tpad(cfg, log=lambda s: None)


def test_ablation_switches(tmp_path):
    r = tpad.run_tpad(tiny_cfg(tmp_path / "single", towers="single", use_text=False), log=lambda s: None)
    assert "align" not in r["stages"] and "gen" in r["stages"]["transfer"]["history"][-1]
    assert "gr_text" not in r["stages"]["knowledge"]["history"][-1]
    emb = json.loads((tmp_path / "single" / "embed_config.json").read_text())
    assert emb["text_fields"] == [] and emb["adapter"] == "knowledge"


def test_embeddings_attach_to_a_dataset_by_id(full_run):
    _, _, out = full_run
    ds = load_dataset({**DEMO, "embeddings": {"tpad": str(out / "embeddings")}})
    assert {"tpad_image", "tpad_text"} <= set(ds.items.features)
    ds2 = load_dataset(DEMO)
    ds2.items.ids[0] = "not-embedded"
    with pytest.raises(DataError, match="no embedding row"):
        attach_item_embeddings(ds2, "tpad", out / "embeddings")
    with pytest.raises(DataError, match="distillrec embed"):
        attach_item_embeddings(ds2, "tpad", out / "nowhere")


# ------------------------------------------------------------------------------------------ a planted transition
def _planted_catalogue(root, n=40, users=300, length=6, seed=0):
    from distillrec.data.synthetic import write_planted_transitions

    return write_planted_transitions(root, n, users, length, seed)


def _planted_cfg(tmp_path, out, align):
    return TPADConfig(**{
        "dataset": {"name": "toy", "format": "s3rec", "path": str(tmp_path / "data")},
        "lm": {"name": "tiny", "seed": 0}, "multimodal": {"connector": "mlp", "lora_r": 8, "lora_dropout": 0.0},
        "image_features": "attributes_onehot", "text_fields": ["textual_id"], "text_view": None,
        "keywords": {"fields": ["textual_id"], "category_field": None, "title_terms": 0},
        "knowledge": {"epochs": 1, "batch_size": 16, "gr_items": 0},
        "transfer": {"epochs": 5, "steps_per_epoch": 20, "batch_size": 16, "lr": 0.01, "heldout_pairs": 64,
                     "context_items": 0},
        # stage 2b's budget as in benchmarks/tpad_planted.py: 40 epochs of the 40 items at lr 5e-3
        "align": {"epochs": 40, "batch_size": 16, "lr": 0.005, "export": "h_dl", **align},
        "embed_batch_size": 32, "progress": False, "out": str(tmp_path / out)})


def test_a_planted_transition_reaches_the_transfer_states_and_stage_2b_carries_it_into_the_export(tmp_path):
    import shutil

    _planted_catalogue(tmp_path / "data")
    cfg = _planted_cfg(tmp_path, "na", {"gamma1": 0.0, "gamma2": 0.0})  # TPAD-NA: the same steps, no alignment
    p = run_tpad(cfg, log=lambda s: None)["probe"]
    chance = p["transfer states"]["valid"]["chance_hr@10"]
    # the raw features and the Knowledge tower (never trained on transitions) know nothing of the cycle; the
    # trained Transfer tower's states retrieve the next item
    for blind in ("raw attributes_onehot", "knowledge after stage 1"):
        assert p[blind]["valid"]["hr@10"] < chance + 0.05, blind
        assert p["transfer states"]["valid"]["mrr"] > 1.5 * p[blind]["valid"]["mrr"], blind
    assert p["transfer states"]["valid"]["hr@10"] > chance + 0.2
    # every representation is probed, the distilled projection included, and the report shows the table
    assert {"knowledge after stage 1", "exported (final)", "exported D_L(h)"} <= set(p)
    assert "## Transition probe" in (tmp_path / "na" / "report.md").read_text()
    ds = load_dataset({**cfg.dataset.model_dump(), "embeddings": {"tpad": str(tmp_path / "na" / "embeddings")}})
    assert ds.items.features["tpad_distilled"].shape == (41, cfg.align.d_proj)
    items = json.loads((tmp_path / "na" / "knowledge" / "items.json").read_text())
    assert len(items) == 40 and len(set(items)) == 40
    # stage 2b with the neighbourhood distillation (gamma3), from the same stages 1 and 2a: the exported h itself
    # now retrieves the planted next item, far above the stage-1 embedding and the same steps without alignment
    for d in ("knowledge", "transfer", "states"):
        shutil.copytree(tmp_path / "na" / d, tmp_path / "sim" / d)
    cfg_sim = _planted_cfg(tmp_path, "sim", {"gamma3": 1.0}).model_copy(update={"probe_mi": True})
    r = run_tpad(cfg_sim, log=lambda s: None)
    q = r["probe"]
    # the fitted MI estimates of what is exported come with the probe when asked for (values: tested below)
    assert set(r["mi_to_transfer"]) == {"knowledge after stage 1", "exported (final)", "exported D_L(h)"}
    assert "What the export holds of the Transfer states" in (tmp_path / "sim" / "report.md").read_text()
    assert q["knowledge after stage 1"] == p["knowledge after stage 1"]  # the same stage 1, reused
    exported, before, na = (x["valid"]["mrr"] for x in (q["exported (final)"], p["knowledge after stage 1"],
                                                         p["exported (final)"]))
    assert exported > 1.5 * before and exported > 1.3 * na, (exported, before, na)
    assert q["exported (final)"]["valid"]["hr@10"] > chance + 0.05


def test_similarity_distillation_is_zero_on_the_teachers_geometry_and_moves_only_the_student():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(12, 6, generator=g)
    # the same geometry with its columns permuted, rescaled and shifted (what the batch standardisation removes):
    # nothing to distil
    same = teacher[:, torch.randperm(6, generator=g)] * torch.rand(6, generator=g).add(0.5) + 7.0
    assert float(similarity_distillation(same, teacher, 0.1)) == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(12, 8, generator=g, requires_grad=True)
    t = teacher.clone().requires_grad_(True)
    loss = similarity_distillation(student, t, 0.1)
    assert float(loss.detach()) > 0.1
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert t.grad is None  # the teacher (the frozen Transfer states) gets no gradient
    assert float(similarity_distillation(student[:2], teacher[:2], 0.1)) == 0.0


def test_neighbour_batches_draw_from_each_items_nearest_transfer_states():
    # two tight clusters in t: every item's nearest items are the other members of its own cluster
    g = torch.Generator().manual_seed(0)
    # (every column carries the clusters: the similarity standardises columns, so a pure-noise column would count)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    t = torch.cat([centres[0] + 0.1 * torch.randn(6, 2, generator=g), centres[1] + 0.1 * torch.randn(6, 2, generator=g)])
    nearest = tpad._nearest_in(t, 4)
    assert nearest.shape == (12, 4)
    for i, row in enumerate(nearest):
        assert i not in row and all((j < 6) == (i < 6) for j in row), (i, row)


def test_fitted_mi_estimates_see_a_dependence_and_not_its_shuffle():
    from distillrec.methods.tpad.mutual_information import fitted_mi_estimates

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 40, generator=g)
    y = x[:, :20] @ torch.randn(20, 30, generator=g) + 0.5 * torch.randn(600, 30, generator=g)
    dep = fitted_mi_estimates(x, y, dims=16, steps=300)
    assert dep["mine_heldout"] > 1.0 and dep["mine_heldout"] > dep["mine_shuffled_heldout"] + 1.0
    assert dep["club_heldout"] > dep["club_shuffled_heldout"] + 1.0
    indep = fitted_mi_estimates(x, torch.randn(600, 30, generator=g), dims=16, steps=300)
    assert abs(indep["mine_heldout"]) < 0.5 and indep["mine_heldout"] < dep["mine_heldout"] - 1.0
