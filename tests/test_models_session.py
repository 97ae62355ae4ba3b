"""Session-based recommenders: SKNN (hand-computed similarities) and SR-GNN (session graphs, learning)."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch

from distillrec.data.dataset import ItemTable, leave_one_out
from distillrec.models import build_model
from distillrec.models.srgnn import session_graphs


def make_dataset(train_sessions: list[list[int]], n_items: int):
    """A dataset whose training sequences are exactly ``train_sessions`` (leave_one_out drops the last two)."""
    held = [n_items - 1, n_items]  # valid / test targets, never in training
    seqs = [np.array(s + held, dtype=np.int64) for s in train_sessions]
    items = ItemTable(ids=[f"i{i}" for i in range(1, n_items + 1)])
    return leave_one_out("toy", items, seqs, [f"u{j}" for j in range(len(seqs))])


def eval_batch(histories: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(h) for h in histories)
    hist = torch.zeros(len(histories), width, dtype=torch.int64)
    for i, h in enumerate(histories):
        hist[i, : len(h)] = torch.tensor(h)
    return {
        "history": hist,
        "lengths": torch.tensor([len(h) for h in histories]),
        "target": torch.ones(len(histories), dtype=torch.int64),
    }


# ---------------------------------------------------------------- SKNN

# Training sessions, in train order (T0 oldest ... T3 most recent), query history {1, 2}:
#   T0 = {1, 2, 3}  overlap 2, cosine 2/sqrt(2*3)
#   T1 = {2, 4}     overlap 1, cosine 1/sqrt(2*2) = 0.5
#   T2 = {5, 6}     no overlap: not a candidate
#   T3 = {4, 1, 7}  overlap 1, cosine 1/sqrt(2*3)
SESSIONS = [[1, 2, 3], [2, 4], [5, 6], [4, 1, 7]]
N_ITEMS = 9
C0, C1, C3 = 2 / math.sqrt(6), 0.5, 1 / math.sqrt(6)


def sknn(**params):
    ds = make_dataset(SESSIONS, N_ITEMS)
    model = build_model("sknn", params, ds)
    model.fit(ds)
    assert not model.trainable
    return model


def expected(neighbours: dict[int, float]) -> np.ndarray:
    out = np.zeros(N_ITEMS + 1)
    for j, sim in neighbours.items():
        for item in set(SESSIONS[j]):
            out[item] += sim
    return out


def test_sknn_cosine_hand_computed():
    scores = sknn().score(eval_batch([[1, 2]]))
    assert scores.shape == (1, N_ITEMS + 1)
    # item 1: T0 + T3; item 2: T0 + T1; item 3: T0; item 4: T1 + T3; item 7: T3; items 5, 6 (only in T2): 0
    want = [0, C0 + C3, C0 + C1, C0, C1 + C3, 0, 0, C3, 0, 0]
    assert scores[0].tolist() == pytest.approx(want, abs=1e-6)


def test_sknn_jaccard_hand_computed():
    scores = sknn(similarity="jaccard").score(eval_batch([[1, 2]]))
    j0, j1, j3 = 2 / 3, 1 / 3, 1 / 4  # |h & s| / |h | s|
    assert scores[0].tolist() == pytest.approx([0, j0 + j3, j0 + j1, j0, j1 + j3, 0, 0, j3, 0, 0], abs=1e-6)


def test_sknn_duplicates_and_padding_in_batch():
    scores = sknn().score(eval_batch([[1, 2, 1], [4]]))
    assert scores[0].tolist() == pytest.approx(expected({0: C0, 1: C1, 3: C3}).tolist(), abs=1e-6)
    # {4}: T1 cosine 1/sqrt(2), T3 cosine 1/sqrt(3)
    want = expected({1: 1 / math.sqrt(2), 3: 1 / math.sqrt(3)})
    assert scores[1].tolist() == pytest.approx(want.tolist(), abs=1e-6)


def test_sknn_keeps_k_neighbours():
    scores = sknn(k=2).score(eval_batch([[1, 2]]))  # the two most similar: T0, T1
    assert scores[0].tolist() == pytest.approx(expected({0: C0, 1: C1}).tolist(), abs=1e-6)
    assert scores[0, 7] == 0  # item 7 only in T3, which is not a neighbour any more
    scores = sknn(k=1).score(eval_batch([[1, 2]]))
    assert scores[0].tolist() == pytest.approx(expected({0: C0}).tolist(), abs=1e-6)


def test_sknn_sample_size_keeps_most_recent_candidates():
    # candidates sharing an item are T0, T1, T3; the 2 most recent of them are T1, T3 (T2 shares nothing)
    scores = sknn(sample_size=2).score(eval_batch([[1, 2]]))
    assert scores[0].tolist() == pytest.approx(expected({1: C1, 3: C3}).tolist(), abs=1e-6)
    scores = sknn(sample_size=1).score(eval_batch([[1, 2]]))
    assert scores[0].tolist() == pytest.approx(expected({3: C3}).tolist(), abs=1e-6)


def test_sknn_recency_weighting():
    # "div": position i of L weighs i / L: item 1 -> 0.5, item 2 -> 1; overlaps become weighted sums
    scores = sknn(recency_weighting="div").score(eval_batch([[1, 2]]))
    want = expected({0: 1.5 / math.sqrt(6), 1: 1.0 / 2, 3: 0.5 / math.sqrt(6)})
    assert scores[0].tolist() == pytest.approx(want.tolist(), abs=1e-6)
    # a repeated item takes the weight of its last occurrence: [2, 1, 2] -> item 1: 2/3, item 2: 1
    scores = sknn(recency_weighting="div").score(eval_batch([[2, 1, 2]]))
    want = expected({0: (2 / 3 + 1) / math.sqrt(6), 1: 1 / 2, 3: (2 / 3) / math.sqrt(6)})
    assert scores[0].tolist() == pytest.approx(want.tolist(), abs=1e-6)


def test_sknn_matches_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    n_items = 30
    sessions = [list(rng.integers(1, n_items - 1, size=rng.integers(1, 7))) for _ in range(60)]
    ds = make_dataset([list(map(int, s)) for s in sessions], n_items)
    queries = [list(map(int, rng.integers(1, n_items - 1, size=rng.integers(1, 6)))) for _ in range(8)]
    for similarity in ("cosine", "jaccard"):
        for sample_size in (0, 10):
            model = build_model("sknn", {"k": 1000, "sample_size": sample_size, "similarity": similarity}, ds)
            model.fit(ds)
            got = model.score(eval_batch(queries)).numpy()
            for q, row in zip(queries, got):
                h = set(q)
                cands = [j for j, s in enumerate(ds.train) if h & set(s.tolist())]
                if sample_size:
                    cands = cands[-sample_size:]
                want = np.zeros(n_items + 1)
                for j in cands:
                    s = set(ds.train[j].tolist())
                    inter = len(h & s)
                    sim = inter / math.sqrt(len(h) * len(s)) if similarity == "cosine" else inter / len(h | s)
                    for item in s:
                        want[item] += sim
                np.testing.assert_allclose(row, want, atol=1e-5)


def test_sknn_config_forbids_unknown_keys():
    ds = make_dataset(SESSIONS, N_ITEMS)
    with pytest.raises(pydantic.ValidationError):
        build_model("sknn", {"neighbours": 5}, ds)
    with pytest.raises(pydantic.ValidationError):
        build_model("sknn", {"similarity": "dice"}, ds)


# ---------------------------------------------------------------- SR-GNN


def reference_graph(u_input: list[int]):
    """The original SR-GNN utils.get_slice for one unpadded session (numpy loop), padding node left out."""
    node = np.unique(u_input)
    u_a = np.zeros((len(node), len(node)))
    for i in np.arange(len(u_input) - 1):
        u = np.where(node == u_input[i])[0][0]
        v = np.where(node == u_input[i + 1])[0][0]
        u_a[u][v] = 1
    u_sum_in = np.sum(u_a, 0)
    u_sum_in[np.where(u_sum_in == 0)] = 1
    u_a_in = np.divide(u_a, u_sum_in)
    u_sum_out = np.sum(u_a, 1)
    u_sum_out[np.where(u_sum_out == 0)] = 1
    u_a_out = np.divide(u_a.transpose(), u_sum_out)
    a = np.concatenate([u_a_in, u_a_out]).transpose()
    alias = [np.where(node == i)[0][0] for i in u_input]
    return node, a, alias


def test_srgnn_graph_with_repeated_item_hand_written():
    batch = eval_batch([[1, 2, 1, 3], [4, 4, 2]])
    g = session_graphs(batch["history"], batch["lengths"])
    # session [1, 2, 1, 3]: nodes (1, 2, 3); edges 1->2, 2->1, 1->3
    assert g["items"][0].tolist() == [1, 2, 3]
    assert g["alias"][0].tolist() == [0, 1, 0, 2]
    a_in = [[0, 1, 0], [1, 0, 0], [1, 0, 0]]  # row v: in-neighbours of v / indeg(v)
    a_out = [[0, 0.5, 0.5], [1, 0, 0], [0, 0, 0]]  # row u: out-neighbours of u / outdeg(u)
    assert g["A"][0, :, :3].tolist() == a_in
    assert g["A"][0, :, 3:].tolist() == a_out
    # session [4, 4, 2] (padded): nodes (2, 4) + one padding node; edges 4->4 (self loop), 4->2
    assert g["items"][1].tolist() == [2, 4, 0]
    assert g["alias"][1, :3].tolist() == [1, 1, 0]
    assert g["A"][1, :, :3].tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert g["A"][1, :, 3:].tolist() == [[0, 0, 0], [0.5, 0.5, 0], [0, 0, 0]]
    assert g["mask"].tolist() == [[True] * 4, [True, True, True, False]]


def test_srgnn_graphs_match_original_loop():
    rng = np.random.default_rng(1)
    sessions = [list(map(int, rng.integers(1, 6, size=rng.integers(1, 9)))) for _ in range(40)]
    batch = eval_batch(sessions)
    g = session_graphs(batch["history"], batch["lengths"])
    for b, s in enumerate(sessions):
        node, a, alias = reference_graph(s)
        n = len(node)
        assert g["items"][b, :n].tolist() == node.tolist()
        assert (g["items"][b, n:] == 0).all()
        assert g["alias"][b, : len(s)].tolist() == alias
        big = g["A"][b]
        big_n = big.shape[0]
        np.testing.assert_allclose(big[:n, :n].numpy(), a[:, :n])
        np.testing.assert_allclose(big[:n, big_n : big_n + n].numpy(), a[:, n:])
        assert big[n:].abs().sum() == 0 and big[:, n:big_n].abs().sum() == 0


def test_srgnn_score_shape_and_init():
    ds = make_dataset(SESSIONS, N_ITEMS)
    model = build_model("srgnn", {}, ds)
    assert model.train_format == "prefix" and model.trainable
    stdv = 1 / math.sqrt(100)
    assert all(p.abs().max() <= stdv for p in model.parameters())
    batch = eval_batch([[1, 2, 1, 3], [4], [5, 6, 7]])
    scores = model.score(batch)
    assert scores.shape == (3, N_ITEMS + 1)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    for params in ({"step": 2}, {"nonhybrid": True}):
        assert build_model("srgnn", params, ds).score(batch).shape == (3, N_ITEMS + 1)
    with pytest.raises(pydantic.ValidationError):
        build_model("srgnn", {"hidden": 8}, ds)


def test_srgnn_learns_next_item_pattern():
    # deterministic successor rule on a cycle of 8 items: the next item after i is i % 8 + 1
    n = 8
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(40):
        start, length = int(rng.integers(1, n + 1)), int(rng.integers(3, 7))
        seqs.append([(start - 1 + t) % n + 1 for t in range(length)])
    ds = make_dataset(seqs, n + 2)  # items 9, 10 are the held-out targets
    ex = ds.train_examples()
    model = build_model("srgnn", {"hidden_size": 16}, ds)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-5)
    full = eval_batch([h.tolist() for h in ex.histories])
    full["target"] = torch.from_numpy(ex.targets)
    losses = []
    model.train()
    for _ in range(60):
        loss = model.loss(full)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    with torch.no_grad():
        pred = model.score(full).argmax(1)
    assert (pred == full["target"]).float().mean() == 1.0
