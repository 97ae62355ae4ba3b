"""The parts DIMO and the fused models share (models/features.py): frozen features, the adapter, the padding-row mask
and the evaluation-time item-table cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distillrec.data.dataset import ItemTable, leave_one_out
from distillrec.models import build_model
from distillrec.models.features import CachedItemTables, frozen_features, make_adapter, standardize_columns

torch.set_num_threads(1)

N = 8
MODELS = {
    "dimo": {"embedding_dim": 16, "num_heads": 2, "co_layers": 2, "top_k_cooccur": 3, "features": ["text"]},
    "fused_sasrec": {"hidden_size": 16, "inner_size": 32, "max_len": 20, "features": ["text", "image"]},
    "fused_gru4rec": {"embedding_size": 16, "hidden_size": 16, "features": ["text"], "fusion": "concat"},
}


@pytest.fixture(scope="module")
def dataset():
    seqs = [np.array([(s + t) % N + 1 for t in range(10)]) for s in range(N) for _ in range(2)]
    items = ItemTable(ids=[f"i{i}" for i in range(1, N + 1)])
    rng = np.random.default_rng(0)
    items.add_features("text", (3.0 + 5.0 * rng.normal(size=(N, 12))).astype(np.float32))
    items.add_features("image", rng.normal(size=(N, 6)).astype(np.float32))
    return leave_one_out("cycle", items, seqs, [f"u{i}" for i in range(len(seqs))])


def built(name, dataset, **params):
    torch.manual_seed(0)
    model = build_model(name, MODELS[name] | params, dataset)
    model.fit(dataset)
    return model


def tables(model) -> torch.Tensor:
    """The model's item table that goes through the adapter (cached in evaluation): DIMO's modality table."""
    return model.item_tables()[1] if model.name == "dimo" else model.item_table()


@pytest.mark.parametrize("norm", ["standardize", "none"])
def test_dimo_modality_view_is_a_fused_model_without_id(norm, dataset):
    """The same frozen features through the same adapter: DIMO's modality table (no propagation) equals a fused model's
    features-only table once the two adapters hold the same weights."""
    dimo = built("dimo", dataset, co_layers=0, feature_norm=norm)
    fused = built("fused_sasrec", dataset, features=["text"], use_id=False, feature_norm=norm)
    assert torch.equal(dimo.item_features, fused.feature_0)
    expected = standardize_columns(dataset.items.features["text"]) if norm == "standardize" \
        else dataset.items.features["text"]
    np.testing.assert_array_equal(fused.feature_0.numpy(), expected)
    # the LayerNorm gain starts at each model's own ID-table init scale: U(-1/sqrt(d), 1/sqrt(d)) for DIMO, the
    # measured std of the ID table for the fused models
    gain = dimo.adapter[1].weight
    assert torch.equal(gain, torch.full_like(gain, 1 / 16**0.5 / 3**0.5))
    with_id = built("fused_sasrec", dataset)
    gain = with_id.adapters[0][1].weight
    assert torch.equal(gain, torch.full_like(gain, float(with_id.item_emb.weight[1:].detach().std())))
    # same layers and parameter names (a strict load), same padding mask: the same table from the same weights
    assert [type(m) for m in dimo.adapter] + [nn.Dropout] == [type(m) for m in fused.adapters[0]]
    fused.adapters[0].load_state_dict(dimo.adapter.state_dict(), strict=True)
    dimo.eval()
    fused.eval()
    with torch.no_grad():
        _, mo_table = dimo.item_tables()
        torch.testing.assert_close(fused.item_table(), mo_table, rtol=0, atol=0)
    assert mo_table[0].abs().sum() == 0  # the shared padding-row mask


def test_make_adapter_layers_and_checkpoint_names(dataset):
    a = make_adapter(5, 4, mlp=True, layernorm=True, gain=0.25, dropout=0.1)
    assert [type(m) for m in a] == [nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm, nn.Dropout]
    assert torch.all(a[3].weight == 0.25) and torch.all(a[3].bias == 0)
    assert [type(m) for m in make_adapter(5, 4, layernorm=False)] == [nn.Linear]
    # checkpoint keys the models have always had (existing checkpoints must load)
    dimo_keys = set(built("dimo", dataset, adapter="mlp").state_dict())
    assert {"adapter.0.weight", "adapter.0.bias", "adapter.2.weight", "adapter.3.weight", "adapter.3.bias"} <= dimo_keys
    fused_keys = set(built("fused_sasrec", dataset).state_dict())
    assert {"adapters.0.0.weight", "adapters.0.1.weight", "adapters.1.0.bias", "adapters.1.1.bias"} <= fused_keys
    assert not any("feature" in k or "row_mask" in k or "cache" in k for k in dimo_keys | fused_keys)


def test_frozen_features_names_missing_ones_and_keeps_dataset_rows(dataset):
    with pytest.raises(ValueError, match="no item feature 'audio'.*image, text.*the hint"):
        frozen_features("m", dataset, ["text", "audio"], "none", "the hint")
    (raw,) = frozen_features("m", dataset, ["text"], "none", "")
    assert raw.dtype == np.float32 and np.array_equal(raw, dataset.items.features["text"])
    (std,) = frozen_features("m", dataset, ["text"], "standardize", "")
    assert std is not dataset.items.features["text"] and np.allclose(std[1:].mean(0), 0, atol=1e-5)
    assert np.all(std[0] == 0)


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_table_cache_contract(name, dataset):
    model = built(name, dataset)
    assert isinstance(model, CachedItemTables)
    some_param = next(p for n, p in model.named_parameters() if "adapters.0" in n or n.startswith("adapter."))
    # evaluation: built once, reused while the weights stay the same
    model.eval()
    with torch.no_grad():
        t1 = tables(model)
        assert tables(model) is t1
    # under autograd (even in eval mode) never cached
    assert tables(model) is not t1 and tables(model).requires_grad
    # an in-place update bumps the parameter's version: rebuilt
    with torch.no_grad():
        some_param.add_(0.5)
        t2 = tables(model)
        assert t2 is not t1 and not torch.equal(t2, t1)
        # a write through .data bumps no version: served from the cache until eval() is called again (the evaluator
        # calls it before every pass)
        some_param.data.sub_(0.5)
        assert tables(model) is t2
        model.eval()
        t3 = tables(model)
        assert t3 is not t2
    with torch.enable_grad():
        torch.testing.assert_close(tables(model).detach(), t3, rtol=0, atol=0)
    # training resumes: train() drops the cache and tables carry gradients; after a step, eval() serves new weights
    model.train()
    with torch.no_grad():
        some_param.data.add_(0.5)  # invisible to the version key: only train()/eval() can drop the cache
    assert tables(model).requires_grad
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    tables(model).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        t4 = tables(model)
        assert not torch.equal(t4, t3)
    with torch.enable_grad():
        torch.testing.assert_close(tables(model).detach(), t4, rtol=0, atol=0)
