"""The transition probe: next-item retrieval from item embeddings alone, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from distillrec.data.dataset import Examples
from distillrec.evaluation.probe import held_out_transitions, standardised_unit_rows, transition_probe


def test_probe_finds_a_planted_transition_and_not_a_random_one():
    rng = np.random.default_rng(0)
    n, d = 60, 16
    base = rng.normal(size=(n + 1, d))
    src = np.arange(1, n, 2)
    dst = src + 1
    planted = base.copy()
    planted[dst] = planted[src] + 0.01 * rng.normal(size=(len(src), d))  # the next item sits next to its source
    r = transition_probe(planted, src, dst, k=1)
    assert r["hr@1"] == 1.0 and r["mrr"] == 1.0 and r["n"] == len(src)
    assert r["chance_hr@1"] == pytest.approx(1 / (n - 1))
    noise = transition_probe(base, src, dst, k=10)
    assert noise["hr@10"] < 0.5 and len(noise["per_row_rr"]) == len(src)


def test_ranks_by_hand_with_pessimistic_ties_and_no_self_retrieval():
    emb = np.array([[0, 0], [1, 0], [1, 0.001], [-1, 0], [0, 1], [0, -1]], dtype=np.float64)
    # item 1's nearest is item 2 (itself excluded); item 3 is its opposite
    r = transition_probe(emb, np.array([1, 1]), np.array([2, 3]), k=1)
    assert r["per_row_rr"][0] == 1.0 and r["per_row_rr"][1] == pytest.approx(1 / 4)
    tied = np.array([[0, 0], [1, 0], [0, 1], [0, 1], [0, -1]], dtype=np.float64)
    r = transition_probe(tied, np.array([2]), np.array([3]), k=1)  # 3 equals 2; 1 and 4 differ
    assert r["per_row_rr"][0] == 1.0
    r = transition_probe(np.array([[0, 0], [1, 0], [0, 1], [0, 1]], float), np.array([1]), np.array([2]), k=1)
    assert r["per_row_rr"][0] == 0.5  # items 2 and 3 tie: counted against the target


def test_columns_are_standardised_and_padding_stays_zero():
    emb = np.array([[9, 9], [1000, 1], [1000, 2], [1000, 4]], dtype=np.float64)  # a huge constant column
    z = standardised_unit_rows(emb)
    assert np.allclose(z[0], 0) and np.allclose(np.linalg.norm(z[1:], axis=1), 1)
    assert np.allclose(z[1:, 0], 0)  # the constant column no longer decides the cosine


def test_held_out_transitions_skip_empty_histories():
    ex = Examples([np.array([3, 4]), np.array([], dtype=np.int64), np.array([7])], np.array([5, 6, 8]))
    src, dst = held_out_transitions(ex)
    assert src.tolist() == [4, 7] and dst.tolist() == [5, 8]
