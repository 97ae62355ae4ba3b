"""GRU4Rec, SASRec and their fused (ID + frozen features) variants on tiny deterministic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from distillrec.data.batching import causal_batch, causal_windows, example_batch
from distillrec.data.dataset import ItemTable, leave_one_out
from distillrec.models import build_model, get_model_class

torch.set_num_threads(1)

N_ITEMS = 8
SMALL = {
    "gru4rec": {"embedding_size": 16, "hidden_size": 32, "dropout_prob": 0.1},
    "sasrec": {
        "hidden_size": 16, "inner_size": 32, "hidden_dropout_prob": 0.1, "attn_dropout_prob": 0.1, "max_len": 20
    },
}
FEATS = {"features": ["text_clip", "image_clip"]}
MODELS = {
    "gru4rec": SMALL["gru4rec"],
    "sasrec": SMALL["sasrec"],
    "fused_gru4rec": SMALL["gru4rec"] | FEATS,
    "fused_sasrec": SMALL["sasrec"] | FEATS,
}


def make_dataset(with_features: bool = True):
    """Sequences that cycle 1 -> 2 -> ... -> 8 -> 1 from every start: the next item is always (item % 8) + 1."""
    seqs = [np.array([(s + t) % N_ITEMS + 1 for t in range(14)]) for s in range(N_ITEMS) for _ in range(2)]
    items = ItemTable(ids=[f"i{i}" for i in range(1, N_ITEMS + 1)])
    if with_features:
        rng = np.random.default_rng(0)
        items.add_features("text_clip", rng.normal(size=(N_ITEMS, 12)).astype(np.float32))
        items.add_features("image_clip", rng.normal(size=(N_ITEMS, 6)).astype(np.float32))
    return leave_one_out("cycle", items, seqs, [f"u{i}" for i in range(len(seqs))])


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


def train_batch(ds, max_len=20):
    return causal_batch(causal_windows(ds.train, max_len))


def fit(model, batch, steps=30, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(MODELS))
def test_score_shape_and_padding_column(name, dataset):
    torch.manual_seed(0)
    model = build_model(name, MODELS[name], dataset).eval()
    batch = example_batch(dataset.test, np.arange(5), 20)
    with torch.no_grad():
        scores = model.score(batch)
    assert scores.shape == (5, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
@pytest.mark.parametrize("name", list(MODELS))
def test_learns_the_cycle(name, loss_type, dataset):
    torch.manual_seed(0)
    model = build_model(name, MODELS[name] | {"loss_type": loss_type}, dataset)
    losses = fit(model, train_batch(dataset), steps=40 if loss_type == "BPR" else 30)
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        scores = model.score(example_batch(dataset.test, np.arange(len(dataset.test)), 20))
    hit1 = (scores.argmax(1) == torch.from_numpy(dataset.test.targets)).float().mean().item()
    assert hit1 >= 0.9, hit1


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "fused_sasrec"])
def test_causal_no_leak(name, dataset):
    """score() on history[:k] equals the training-time representation at position k-1: neither the future items nor
    the right padding leak into a position."""
    torch.manual_seed(0)
    model = build_model(name, MODELS[name], dataset).eval()
    batch = train_batch(dataset)
    hist, lengths = batch["history"][:4], batch["lengths"][:4]
    with torch.no_grad():
        table = model.item_table()
        full = model.encode(hist, table) @ table.T  # [B, L, n + 1]
        for k in range(1, hist.shape[1] + 1):
            prefix = {"history": hist[:, :k], "lengths": lengths.clamp(max=k)}
            s = model.score(prefix)
            torch.testing.assert_close(s[:, 1:], full[:, k - 1, 1:], rtol=1e-4, atol=1e-5)
        # extra padding columns change nothing either
        padded = {"history": torch.nn.functional.pad(hist[:, :3], (0, 9)), "lengths": torch.full((4,), 3)}
        torch.testing.assert_close(model.score(padded)[:, 1:], full[:, 2, 1:], rtol=1e-4, atol=1e-5)


def test_sasrec_eval_history_longer_than_max_len(dataset):
    torch.manual_seed(0)
    model = build_model("sasrec", SMALL["sasrec"] | {"max_len": 5}, dataset).eval()
    hist = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0], [3, 4, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        long = model.score({"history": hist, "lengths": torch.tensor([7, 2])})
        clipped = torch.tensor([[3, 4, 5, 6, 7], [3, 4, 0, 0, 0]])
        short = model.score({"history": clipped, "lengths": torch.tensor([5, 2])})
    torch.testing.assert_close(long, short)
    with pytest.raises(ValueError, match="max_len"):
        model.loss({"history": hist, "lengths": torch.tensor([7, 2]), "target_seq": hist})


def test_bpr_is_deterministic_under_seed(dataset):
    batch = train_batch(dataset)
    out = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("sasrec", SMALL["sasrec"] | {"loss_type": "BPR"}, dataset)
        out.append(fit(model, batch, steps=3))
    assert out[0] == out[1]


def test_configs_defaults_and_unknown_keys():
    g, s = get_model_class("gru4rec").Config(), get_model_class("sasrec").Config()
    assert (g.embedding_size, g.hidden_size, g.num_layers, g.dropout_prob, g.loss_type) == (64, 128, 1, 0.3, "CE")
    assert (s.n_layers, s.n_heads, s.hidden_size, s.inner_size, s.max_len) == (2, 2, 64, 256, 50)
    assert (s.hidden_dropout_prob, s.attn_dropout_prob, s.hidden_act, s.layer_norm_eps) == (0.5, 0.5, "gelu", 1e-12)
    for name in MODELS:
        with pytest.raises(ValidationError):
            get_model_class(name).Config(**(MODELS[name] | {"hidden_sise": 3}))
    with pytest.raises(ValidationError):
        get_model_class("fused_sasrec").Config()  # features are required


@pytest.mark.parametrize("name", ["fused_gru4rec", "fused_sasrec"])
def test_fused_missing_feature_names_it_and_the_available_ones(name, dataset):
    with pytest.raises(ValueError, match=r"'audio'.*available features: image_clip, text_clip"):
        build_model(name, MODELS[name] | {"features": ["text_clip", "audio"]}, dataset)
    with pytest.raises(ValueError, match="available features: none"):
        build_model(name, MODELS[name], make_dataset(with_features=False))


@pytest.mark.parametrize("options", [{"fusion": "concat"}, {"use_id": False}, {"use_id": False, "fusion": "concat"}])
def test_fused_options_train(options, dataset):
    torch.manual_seed(0)
    model = build_model("fused_sasrec", MODELS["fused_sasrec"] | options, dataset)
    if not options.get("use_id", True):
        assert model.item_emb is None
    losses = fit(model, train_batch(dataset), steps=20)
    assert losses[-1] < losses[0]


def test_fused_features_frozen_and_not_checkpointed(dataset):
    model = build_model("fused_gru4rec", MODELS["fused_gru4rec"], dataset)
    assert not any("feature_" in k for k in model.state_dict())
    assert not model.feature_0.requires_grad
    before = model.feature_0.clone()
    fit(model, train_batch(dataset), steps=2)
    torch.testing.assert_close(model.feature_0, before)
    torch.testing.assert_close(model.item_table()[0], torch.zeros(model.item_dim))
    # the evaluation-time table cache follows weight changes: in-place updates, and writes through .data (which
    # bump no version) once eval() is called again, as the evaluator does before every pass
    model.eval()
    with torch.no_grad():
        t1 = model.item_table().clone()
        model.adapters[0][1].bias.add_(1.0)  # the LayerNorm's bias: shifts every real item's vector by 1
        torch.testing.assert_close(model.item_table()[1:], t1[1:] + 1)
        model.adapters[0][1].bias.data.sub_(1.0)
        torch.testing.assert_close(model.eval().item_table(), t1)
