"""DIMO: the co-occurrence graph (training data only), the losses on hand-made vectors, frozen features, scoring."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch

from distillrec.data.batching import example_batch
from distillrec.data.dataset import Dataset, Examples, ItemTable, leave_one_out
from distillrec.models import build_model, get_model_class
from distillrec.models import dimo as dimo_module
from distillrec.models.dimo import (
    DIMO, cooccurrence_counts, cooccurrence_loss, counterfactual_loss, proxy_loss, sample_negatives, top_cooccurring,
)
from distillrec.training.checkpoint import load_checkpoint, save_checkpoint

from conftest import TINY_DEMO

torch.set_num_threads(1)

SMALL = {"embedding_dim": 16, "num_heads": 2, "co_layers": 2, "top_k_cooccur": 3}
# loss(prefix_batch(cycle_dataset())) of fitted(ds, features=["text"]) after torch.manual_seed(1), default aux settings
DEFAULT_LOSS = 2.0848107


def explicit_dataset(train, valid, test, n_items, features=None) -> Dataset:
    items = ItemTable(ids=[f"i{i}" for i in range(1, n_items + 1)])
    for name, rows in (features or {}).items():
        items.add_features(name, rows)
    ex = lambda rows: Examples([np.array(h) for h, _ in rows], np.array([t for _, t in rows], dtype=np.int64))  # noqa
    return Dataset("toy", items, [np.array(s, dtype=np.int64) for s in train], ex(valid), ex(test))


def cycle_dataset(n=8, with_features=True):
    """Every sequence walks the cycle 1 -> 2 -> ... -> n -> 1; two frozen feature matrices."""
    seqs = [np.array([(s + t) % n + 1 for t in range(10)]) for s in range(n) for _ in range(2)]
    items = ItemTable(ids=[f"i{i}" for i in range(1, n + 1)])
    if with_features:
        rng = np.random.default_rng(0)
        items.add_features("text", rng.normal(size=(n, 12)).astype(np.float32))
        items.add_features("image", rng.normal(size=(n, 6)).astype(np.float32))
    return leave_one_out("cycle", items, seqs, [f"u{i}" for i in range(len(seqs))])


def prefix_batch(ds, max_len=20):
    ex = ds.train_examples()
    return example_batch(ex, np.arange(len(ex)), max_len)


def fitted(ds, **params):
    torch.manual_seed(0)
    model = build_model("dimo", SMALL | params, ds)
    model.fit(ds)
    return model


def dense_adjacency(model):
    return model.adjacency.to_dense()


# ---------------------------------------------------------------- registry and config


def test_registry_builds_dimo_and_config_forbids_unknown_keys():
    ds = cycle_dataset()
    assert get_model_class("dimo") is DIMO
    model = build_model("dimo", {}, ds)
    assert model.train_format == "prefix" and model.trainable
    assert model.config.embedding_dim == 100 and model.config.co_layers == 4 and model.config.log_base == 10.0
    assert model.weights() == (1e-3, 1e-3, 1e-3)
    assert build_model("dimo", {"aux_weight": 0.1, "proxy_weight": 0.5}, ds).weights() == (0.1, 0.5, 0.1)
    with pytest.raises(pydantic.ValidationError):
        build_model("dimo", {"embedding_size": 8}, ds)
    with pytest.raises(ValueError, match="no item feature 'clip'.*image, text"):
        build_model("dimo", {"features": ["clip"]}, ds)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        build_model("dimo", {"embedding_dim": 10, "num_heads": 4}, ds)


# ---------------------------------------------------------------- co-occurrence statistics


def test_cooccurrence_counts_hand_computed():
    seqs = [np.array([1, 2, 3, 1]), np.array([4])]
    # whole sequence (the released rule): ordered pairs of positions with different items
    r, c, n = cooccurrence_counts(seqs, 5, None)
    got = {(int(a), int(b)): int(k) for a, b, k in zip(r, c, n)}
    assert got == {(1, 2): 2, (2, 1): 2, (1, 3): 2, (3, 1): 2, (2, 3): 1, (3, 2): 1}
    # window 1: neighbours only
    r, c, n = cooccurrence_counts(seqs, 5, 1)
    got = {(int(a), int(b)): int(k) for a, b, k in zip(r, c, n)}
    assert got == {(1, 2): 1, (2, 1): 1, (2, 3): 1, (3, 2): 1, (3, 1): 1, (1, 3): 1}
    # the model's graph is the row-normalised count matrix
    ds = explicit_dataset([[1, 2, 3, 1], [4]], [([1], 2)], [([1], 2)], 5)
    a = dense_adjacency(fitted(ds, cooccur_window=None))
    want = torch.zeros(6, 6)
    want[1, 2] = want[1, 3] = 0.5
    want[2, 1], want[2, 3] = 2 / 3, 1 / 3
    want[3, 1], want[3, 2] = 2 / 3, 1 / 3
    torch.testing.assert_close(a, want)


def test_fit_uses_training_sequences_only():
    # items 5..8 co-occur only in valid / test rows (history and target): the graph must not see them
    train = [[1, 2, 3], [2, 4], [1, 4]]
    ds = explicit_dataset(train, [([5, 6], 7)], [([6, 7, 8], 5), ([1, 5], 2)], 8)
    model = fitted(ds, cooccur_window=None)
    a = dense_adjacency(model)
    assert a[1, 2] > 0 and a[2, 4] > 0 and a[1, 4] > 0
    assert a[5:, :].abs().sum() == 0 and a[:, 5:].abs().sum() == 0
    assert a[0].abs().sum() == 0 and a[:, 0].abs().sum() == 0
    assert not set(model.pos_items.flatten().tolist()) & {5, 6, 7, 8}
    assert set(model.co_items.tolist()) == {1, 2, 3, 4}


def test_top_k_positives_and_negatives():
    seqs = [np.array(s) for s in ([1, 2], [1, 2], [1, 3], [1, 2, 4], [5, 6])]
    r, c, n = cooccurrence_counts(seqs, 8, None)
    items, weights = top_cooccurring(r, c, n, 8, 2)
    assert items[1].tolist() == [2, 3]  # counts 3 (item 2), 1 (3), 1 (4): ties broken by smaller id
    np.testing.assert_allclose(weights[1], [0.75, 0.25])
    assert items[7].tolist() == [0, 0] and weights[7].tolist() == [0, 0]  # never co-occurs: empty
    assert items[0].tolist() == [0, 0]
    neg = sample_negatives(r, c, 8, 3, np.random.default_rng(0))
    linked = {(int(a), int(b)) for a, b in zip(r, c)}
    for i in range(1, 9):
        assert all(1 <= j <= 8 and j != i and (i, j) not in linked for j in neg[i])
    assert neg[0].tolist() == [0, 0, 0]


def test_criterion_flag():
    ds = explicit_dataset([[1, 2], [3, 4]], [([1], 2)], [([1], 2)], 6)
    model = fitted(ds)
    history = torch.tensor([[1, 0], [1, 3], [1, 0], [5, 0]])
    target = torch.tensor([2, 4, 3, 6])
    assert model.criterion_flag(history, target).tolist() == [1.0, 1.0, -1.0, -1.0]


# ---------------------------------------------------------------- losses on hand-made vectors


def test_proxy_loss_formula_and_argument_order():
    ident = [lambda x: x] * 8
    s_id, p_id = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    s_mo, p_mo = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    # a: cos(s_id, p_id) = 1 against cos(s_id, s_mo) = 0; b: cos(s_mo, p_mo) = 1/sqrt2 against cos(s_mo, s_id) = 0
    c = 1 / math.sqrt(2)
    a = math.log10(math.e**1) - math.log10(math.e**1 + math.e**0)
    b = math.log10(math.e**c) - math.log10(math.e**c + math.e**0)
    got = proxy_loss(s_id, p_id, s_mo, p_mo, ident)
    assert float(got) == pytest.approx(-(a + b), abs=1e-6)
    # the released call order (s_id, s_mo, p_id, p_mo) gives another value
    swapped = proxy_loss(s_id, s_mo, p_id, p_mo, ident)
    assert abs(float(swapped) - float(got)) > 0.1
    # log base: natural log scales every term by ln(10)
    assert float(proxy_loss(s_id, p_id, s_mo, p_mo, ident, log_base=math.e)) == pytest.approx(
        float(got) * math.log(10), abs=1e-6)
    # eight distinct maps: W6 (unused in the released code) acts on p_mo
    maps = list(ident)
    maps[5] = lambda x: -x
    flipped = proxy_loss(s_id, p_id, s_mo, p_mo, maps)
    b_flip = math.log10(math.e**-c) - math.log10(math.e**-c + math.e**0)
    assert float(flipped) == pytest.approx(-(a + b_flip), abs=1e-6)
    # sum reduction over the batch
    two = proxy_loss(s_id.repeat(2, 1), p_id.repeat(2, 1), s_mo.repeat(2, 1), p_mo.repeat(2, 1), ident,
                     reduction="sum")
    assert float(two) == pytest.approx(-2 * (a + b), abs=1e-6)


def test_counterfactual_loss_formula():
    s_id, s_mo = torch.tensor([[1.0, 0.0]] * 2), torch.tensor([[0.0, 1.0]] * 2)
    y_id, y_mo = torch.tensor([[1.0, 0.0]] * 2), torch.tensor([[1.0, 0.0]] * 2)  # cos: id 1, mo 0
    flag = torch.tensor([1.0, -1.0])
    c = math.log10(math.e) - math.log10(math.e + 1)
    assert float(counterfactual_loss(s_id, s_mo, y_id, y_mo, torch.ones(2), reduction="sum")) == pytest.approx(-2 * c)
    assert float(counterfactual_loss(s_id[:1], s_mo[:1], y_id[:1], y_mo[:1], -torch.ones(1))) == pytest.approx(c)
    assert float(counterfactual_loss(s_id, s_mo, y_id, y_mo, flag)) == pytest.approx(0.0, abs=1e-7)


def test_cooccurrence_loss_formula_and_sum_reduction():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos 1 and 1/sqrt2
    negatives = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])  # cos (0, -1) and (1, 0)
    c = 1 / math.sqrt(2)
    l0 = math.log10(math.e**1 + math.e**0 + math.e**-1) - math.log10(math.e**1)
    l1 = math.log10(math.e**c + math.e**1 + math.e**0) - math.log10(math.e**c)
    assert float(cooccurrence_loss(anchors, positives, negatives)) == pytest.approx((l0 + l1) / 2, abs=1e-6)
    # sum = mean x number of anchors (the released code sums over the items)
    assert float(cooccurrence_loss(anchors, positives, negatives, reduction="sum")) == pytest.approx(l0 + l1, abs=1e-6)


def test_model_calls_proxy_loss_in_documented_order(monkeypatch):
    ds = cycle_dataset()
    model = fitted(ds, features=["text"], dropout=0.0, attn_dropout=0.0)
    batch = prefix_batch(ds)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return proxy_loss(*args, **kwargs)

    monkeypatch.setattr(dimo_module, "proxy_loss", spy)
    model.loss(batch)
    with torch.no_grad():
        enc = model.encode(batch)
    s_id, p_id, s_mo, p_mo = calls[0][:4]
    for got, name in ((s_id, "s_id"), (p_id, "p_id"), (s_mo, "s_mo"), (p_mo, "p_mo")):
        torch.testing.assert_close(got.detach(), enc[name])
    assert calls[0][4] is model.proxy_maps and len({id(m) for m in model.proxy_maps}) == 8


# ---------------------------------------------------------------- model behaviour


def auxiliary_terms_by_hand(model, batch):
    """The three unweighted auxiliary losses, mean-reduced, from the free functions (every anchor item for L_co)."""
    enc = model.encode(batch)
    table, items = enc["id_table"], model.co_items
    positives = (table[model.pos_items[items]] * model.pos_weights[items].unsqueeze(-1)).sum(1)
    co = cooccurrence_loss(table[items], positives, table[model.neg_items[items]])
    pro = proxy_loss(enc["s_id"], enc["p_id"], enc["s_mo"], enc["p_mo"], model.proxy_maps)
    target = batch["target"]
    flag = model.criterion_flag(batch["history"], target)
    cri = counterfactual_loss(enc["s_id"], enc["s_mo"], enc["id_table"][target], enc["mo_table"][target], flag)
    ce = torch.nn.functional.cross_entropy(model._logits(enc), target - 1)
    return ce, co, pro, cri


def test_default_loss_is_ce_plus_mean_auxiliary_terms_times_1e3():
    ds = cycle_dataset()
    batch = prefix_batch(ds)
    # the default: mean reduction, every weight 1e-3 (the released lamdba)
    model = fitted(ds, features=["text"], dropout=0.0, attn_dropout=0.0)
    assert model.config.aux_reduction == "mean" and model.weights() == (1e-3, 1e-3, 1e-3)
    assert len(model.co_items) <= model.config.co_items_per_batch  # all anchors, no sampling
    ce, co, pro, cri = auxiliary_terms_by_hand(model, batch)
    want = ce + 1e-3 * (co + pro + cri)
    torch.testing.assert_close(model.loss(batch), want)
    # the default's value, pinned (dropout on, seeded), so a later change of the default shows here
    model = fitted(ds, features=["text"])
    torch.manual_seed(1)
    assert model.loss(batch).item() == pytest.approx(DEFAULT_LOSS, rel=1e-5)


def test_aux_reduction_sum_scales_each_auxiliary_term():
    ds = cycle_dataset()
    batch = prefix_batch(ds)
    n_rows = len(batch["target"])
    params = {"features": ["text"], "dropout": 0.0, "attn_dropout": 0.0}
    mean_model, sum_model = fitted(ds, **params), fitted(ds, aux_reduction="sum", **params)
    n_co = len(mean_model.co_items)
    assert n_co == ds.n_items < mean_model.config.co_items_per_batch  # every anchor in each batch
    mean, summed = mean_model.loss_terms(batch), sum_model.loss_terms(batch)
    _, co, pro, cri = auxiliary_terms_by_hand(mean_model, batch)
    torch.testing.assert_close(summed["ce"], mean["ce"])
    # sum = mean x count: L_pro and L_cri over the batch rows, L_co over the anchor items; the weight stays 1e-3
    torch.testing.assert_close(summed["pro"], 1e-3 * pro * n_rows)
    torch.testing.assert_close(summed["cri"], 1e-3 * cri * n_rows)
    torch.testing.assert_close(summed["co"], 1e-3 * co * n_co)
    for key, count in (("pro", n_rows), ("cri", n_rows), ("co", n_co)):
        assert summed[key].item() == pytest.approx(mean[key].item() * count, rel=1e-5)
    # with sampled anchors, L_co is the sampled mean scaled to the number of anchor items
    small = {"co_items_per_batch": 3} | params
    terms = []
    for reduction in ("mean", "sum"):
        model = fitted(ds, aux_reduction=reduction, **small)
        torch.manual_seed(7)  # the same 3 anchors in both
        terms.append(model.loss_terms(batch)["co"])
    assert terms[1].item() == pytest.approx(terms[0].item() * n_co, rel=1e-5)




@pytest.mark.parametrize("features", [[], ["text", "image"]])
def test_score_shape_and_padding_column(features):
    ds = cycle_dataset()
    with pytest.raises(RuntimeError, match="fit"):
        build_model("dimo", SMALL, ds).score(prefix_batch(ds))
    model = fitted(ds, features=features).eval()
    batch = example_batch(ds.test, np.arange(len(ds.test)), 20)
    with torch.no_grad():
        scores = model.score(batch)
    assert scores.shape == (len(ds.test), ds.n_items + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    assert (scores.argmax(1) > 0).all()
    # proxies and session vectors ignore padding: the same history padded wider scores the same
    wide = {k: v.clone() for k, v in batch.items()}
    wide["history"] = torch.cat([batch["history"], torch.zeros(len(ds.test), 3, dtype=torch.int64)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model.score(wide), scores)
        enc, enc_wide = model.encode(batch), model.encode(wide)
    for key in ("s_id", "s_mo", "p_id", "p_mo"):
        torch.testing.assert_close(enc_wide[key], enc[key])
    # the proxy is the mean of the session's (propagated) item vectors
    for row in range(len(ds.test)):
        items = batch["history"][row, : batch["lengths"][row]]
        torch.testing.assert_close(enc["p_id"][row], enc["id_table"][items].mean(0))
        torch.testing.assert_close(enc["p_mo"][row], enc["mo_table"][items].mean(0))


def test_loss_decreases_and_learns_the_cycle():
    ds = cycle_dataset()
    # window 1: with 8 items, a wider window links almost every pair and the propagation blurs the items together
    model = fitted(ds, features=["text", "image"], aux_weight=0.1, cooccur_window=1)
    batch = prefix_batch(ds)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    losses = []
    for _ in range(50):
        terms = model.loss_terms(batch)
        assert set(terms) == {"ce", "co", "pro", "cri"}
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        pred = model.score(batch).argmax(1)
    assert (pred == batch["target"]).float().mean() > 0.9


def test_features_frozen_and_never_reinitialised():
    ds = cycle_dataset()
    original = np.concatenate([ds.items.features["text"], ds.items.features["image"]], axis=1).copy()
    model = fitted(ds, features=["text", "image"], adapter="mlp", feature_norm="none")
    feats = model.item_features
    assert torch.equal(feats, torch.from_numpy(original))  # exactly the dataset rows after construction
    assert not feats.requires_grad and all(p is not feats for p in model.parameters())
    assert not any("feature" in k or k in {"adjacency", "pos_items"} for k in model.state_dict())
    adapter_before = [p.detach().clone() for p in model.adapter.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        loss = model.loss(prefix_batch(ds))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.item_features, torch.from_numpy(original))
    np.testing.assert_array_equal(np.concatenate([ds.items.features["text"], ds.items.features["image"]], 1), original)
    assert any(not torch.equal(a, b) for a, b in zip(adapter_before, model.adapter.parameters()))  # adapter trains
    # standardised features: column-wise z-scores of the same rows (padding row 0), still frozen
    std = fitted(ds, features=["text", "image"], adapter="mlp")
    body = original[1:]
    expect = (body - body.mean(0)) / np.where(body.std(0) > 1e-8, body.std(0), np.inf)
    np.testing.assert_allclose(std.item_features[1:].numpy(), expect, atol=1e-5)
    assert torch.all(std.item_features[0] == 0)
    # the modality table's padding row stays zero despite adapter biases
    model.eval()
    with torch.no_grad():
        id_table, mo_table = model.item_tables()
    assert id_table[0].abs().sum() == 0 and mo_table[0].abs().sum() == 0


def test_dropout_only_in_training_mode():
    ds = cycle_dataset()
    model = fitted(ds, features=["text"])
    batch = example_batch(ds.test, np.arange(len(ds.test)), 20)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.score(batch), model.score(batch), rtol=0, atol=0)
        torch.testing.assert_close(model.score(batch), model.eval().score(batch), rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.score(batch), model.score(batch))
    no_drop = fitted(ds, features=["text"], dropout=0.0, attn_dropout=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(no_drop.score(batch), no_drop.score(batch), rtol=0, atol=0)


def test_eval_cache_follows_weight_changes():
    ds = cycle_dataset()
    model = fitted(ds, features=["text"]).eval()
    batch = example_batch(ds.test, np.arange(len(ds.test)), 20)
    with torch.no_grad():
        before = model.score(batch)
        model.id_emb.weight.mul_(2.0)
        assert not torch.equal(model.score(batch), before)


def test_checkpoint_roundtrip_after_refit(tmp_path):
    ds = cycle_dataset()
    model = fitted(ds, features=["text"])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(3):
        loss = model.loss(prefix_batch(ds))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(tmp_path / "m.safetensors", model, {})
    torch.manual_seed(123)
    again = build_model("dimo", SMALL | {"features": ["text"]}, ds)
    again.fit(ds)  # what the trainer, evaluate_run and serving do before loading
    load_checkpoint(tmp_path / "m.safetensors", again)
    batch = example_batch(ds.test, np.arange(len(ds.test)), 20)
    with torch.no_grad():
        torch.testing.assert_close(again.eval().score(batch), model.eval().score(batch))


def test_one_epoch_through_the_trainer(tmp_path):
    from distillrec.runs import load_config
    from distillrec.training.trainer import run

    params = SMALL | {"features": ["attributes_onehot"], "co_items_per_batch": 64}
    cfg = {
        "model": {"name": "dimo", "params": params},
        "dataset": TINY_DEMO,
        "train": {"epochs": 1, "batch_size": 128, "patience": 1, "progress": False, "max_len": 20},
    }
    metrics = run(load_config(cfg), tmp_path / "dimo")
    assert metrics["seeds"][0]["epochs_run"] == 1
    assert math.isfinite(metrics["seeds"][0]["history"][0]["train_loss"])
    assert 0.0 <= metrics["test"]["ndcg@10"] <= 1.0
    assert (tmp_path / "dimo" / "checkpoints" / "seed2024" / "best.safetensors").exists()
