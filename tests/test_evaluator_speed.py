"""The fast evaluation path (blocked ranking, reused score buffer, one encoder pass for valid + test) gives exactly
the ranks of the direct path it replaced, on fixed models."""

import numpy as np
import pytest
import torch

from distillrec.data.batching import iterate_example_batches
from distillrec.data.synthetic import make_demo_shop
from distillrec.evaluation.evaluator import EvalProtocol, rank_examples, rank_valid_and_test
from distillrec.evaluation.metrics import reference_pessimistic_ranks
from distillrec.models import build_model


@torch.no_grad()
def direct_ranks(model, examples, protocol, max_len):
    """The evaluator before issue 14: model.score per length-sorted batch, the copy-and-count rank formula."""
    model.eval()
    lengths = np.array([min(len(h), max_len) for h in examples.histories])
    order = np.argsort(lengths, kind="stable")
    ranks = np.zeros(len(examples), dtype=np.int64)
    done = 0
    for _, batch in iterate_example_batches(examples, protocol.batch_size, max_len, order=order):
        r = reference_pessimistic_ranks(model.score(batch), batch["target"], batch["history"], protocol.mask_history)
        ranks[order[done : done + len(r)]] = r.numpy()
        done += len(r)
    return ranks


@pytest.fixture(scope="module")
def shop():
    ds = make_demo_shop(n_items=150, n_users=400, seed=3, write_images=False)
    ds.items.add_features("noise", np.random.default_rng(0).normal(size=(ds.n_items, 16)))
    return ds


MODELS = [
    ("sasrec", {"max_len": 8, "hidden_size": 32, "inner_size": 64}),
    ("gru4rec", {"embedding_size": 32, "hidden_size": 48}),
    ("fused_sasrec", {"max_len": 8, "hidden_size": 32, "inner_size": 64, "features": ["noise"]}),
    ("pop", {}),
]


@pytest.mark.parametrize("name,params", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("mask_history", [False, True])
def test_fast_ranks_equal_the_direct_path(shop, name, params, mask_history):
    torch.manual_seed(0)
    model = build_model(name, params, shop)
    model.fit(shop)
    with torch.no_grad():  # weights far from their small init, so scores spread and near-ties are real tests
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    protocol = EvalProtocol(batch_size=37, mask_history=mask_history)
    max_len = 8  # shorter than many test histories: those rows take the separate path
    want_v = direct_ranks(model, shop.valid, protocol, max_len)
    want_t = direct_ranks(model, shop.test, protocol, max_len)
    assert (rank_examples(model, shop.valid, protocol, max_len) == want_v).all()
    got_v, got_t = rank_valid_and_test(model, shop.valid, shop.test, protocol, max_len)
    assert (got_v == want_v).all() and (got_t == want_t).all()
    rows = np.arange(0, len(shop.valid), 3)  # a DDP-style stripe
    got_v, got_t = rank_valid_and_test(model, shop.valid, shop.test, protocol, max_len, rows)
    assert (got_v == want_v[rows]).all() and (got_t == want_t[rows]).all()
    # the shared pass was really taken by the causal models
    lengths = np.array([len(h) for h in shop.test.histories])
    assert hasattr(model, "score_last_two_into") == (name != "pop") and (lengths <= max_len).sum() > 50


def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients():
    from distillrec.models.sequential import ChunkedCrossEntropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(103, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(57, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 57, (103,), generator=g)
    plain = torch.nn.functional.cross_entropy(h @ w.T, y)
    gh, gw = torch.autograd.grad(plain * 3.0, (h, w))
    for chunk in (1, 10, 103, 500):
        loss = ChunkedCrossEntropy.apply(h, w, y, chunk)
        ch, cw = torch.autograd.grad(loss * 3.0, (h, w))
        assert torch.allclose(loss, plain, atol=1e-12) and torch.allclose(ch, gh, atol=1e-12)
        assert torch.allclose(cw, gw, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: ChunkedCrossEntropy.apply(a, b, y, 7), (h, w))


def test_ce_chunk_trains_a_sequential_model_like_one_chunk(shop):
    # same seed, same batches: chunked and plain CE give the same loss and (to float rounding) the same weights
    from distillrec.data.batching import causal_batch, causal_windows

    batch = causal_batch(causal_windows(shop.train[:64], 8))
    losses, weights = [], []
    for chunk in (None, 50):
        torch.manual_seed(0)
        model = build_model("sasrec", {"max_len": 8, "hidden_size": 32, "inner_size": 64, "ce_chunk": chunk}, shop)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):
            loss = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-5 and torch.allclose(weights[0], weights[1], atol=1e-5)
