"""Metric code against hand-computed examples."""

import math

import numpy as np
import pytest
import torch

from distillrec.evaluation.metrics import (
    aggregate_seeds,
    mean_ci,
    mean_metrics,
    metrics_from_ranks,
    paired_test,
    pessimistic_ranks,
    reference_pessimistic_ranks,
    slice_metrics,
)


def test_ranks_are_pessimistic_and_skip_padding():
    # items 1..5; column 0 is padding and has the highest raw score: it must never count
    scores = torch.tensor(
        [
            [9.0, 0.1, 0.5, 0.5, 0.2, 0.9],  # target 2 ties with item 3 -> pessimistic rank 2 (item 5, item 3 above)
            [9.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied: target ranked last (rank 4)
            [9.0, 0.3, 0.2, 0.1, 0.0, -1.0],  # target 1 is best: rank 0
        ]
    )
    ranks = pessimistic_ranks(scores, torch.tensor([2, 3, 1]))
    assert ranks.tolist() == [2, 4, 0]


def test_history_masking_is_an_option():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.1]])
    history = torch.tensor([[1, 2, 0]])
    assert pessimistic_ranks(scores, torch.tensor([3]), history, mask_history=False).tolist() == [2]
    assert pessimistic_ranks(scores, torch.tensor([3]), history, mask_history=True).tolist() == [0]
    # a target inside the masked history can no longer be hit: ranked after every item
    assert pessimistic_ranks(scores, torch.tensor([1]), history, mask_history=True).tolist() == [4]


def test_nan_scores_never_win():
    scores = torch.tensor([[0.0, float("nan"), 0.5, 0.2]])
    assert pessimistic_ranks(scores, torch.tensor([2])).tolist() == [0]


@pytest.mark.parametrize("mask", [False, True])
def test_blocked_ranks_equal_the_direct_formula_with_ties_nan_and_inf(mask):
    # the evaluator's fast compare-and-count must give exactly the ranks of the direct formula
    g = torch.Generator().manual_seed(0)
    for rows in (1, 15, 16, 17, 203):
        scores = torch.randint(0, 7, (rows, 41), generator=g).float()  # many ties
        scores[torch.rand(scores.shape, generator=g) < 0.05] = float("nan")
        scores[torch.rand(scores.shape, generator=g) < 0.03] = float("inf")
        scores[torch.rand(scores.shape, generator=g) < 0.03] = -float("inf")
        targets = torch.randint(1, 41, (rows,), generator=g)
        history = torch.randint(0, 41, (rows, 5), generator=g)
        before = scores.clone()
        fast = pessimistic_ranks(scores, targets, history, mask)
        assert torch.equal(scores.isnan(), before.isnan()) and torch.equal(scores.nan_to_num(), before.nan_to_num())
        assert fast.tolist() == reference_pessimistic_ranks(scores, targets, history, mask).tolist()


def test_metric_values_by_hand():
    ranks = np.array([0, 2, 4, 12])
    m = metrics_from_ranks(ranks, (1, 5, 10))
    assert m["hr@1"].tolist() == [1, 0, 0, 0]
    assert m["hr@5"].tolist() == [1, 1, 1, 0]
    assert m["ndcg@5"] == pytest.approx([1.0, 1 / math.log2(4), 1 / math.log2(6), 0.0])
    assert m["mrr@10"] == pytest.approx([1.0, 1 / 3, 1 / 5, 0.0])
    assert np.array_equal(m["recall@10"], m["hr@10"])
    means = mean_metrics(ranks, (5,))
    assert means["ndcg@5"] == pytest.approx((1 + 0.5 + 1 / math.log2(6)) / 4)


def test_slices_count_rows_and_split_by_training_frequency():
    ranks = np.array([0, 30, 1, 50])
    targets = np.array([1, 2, 3, 3])
    lengths = np.array([1, 2, 7, 12])
    counts = np.array([0, 0, 3, 25])  # item 1 never seen in training, item 2 three times, item 3 25 times
    s = slice_metrics(ranks, targets, lengths, counts, ks=(10,))
    f = s["target_train_frequency"]
    assert (f["0"]["n"], f["1-4"]["n"], f["5-19"]["n"], f["20+"]["n"]) == (1, 1, 0, 2)
    assert f["0"]["hr@10"] == 1.0 and f["1-4"]["hr@10"] == 0.0 and f["20+"]["hr@10"] == 0.5
    h = s["history_length"]
    assert h["1"]["n"] == 1 and h["2-3"]["n"] == 1 and h["7-10"]["n"] == 1 and h["11+"]["n"] == 1


def test_mean_ci_matches_t_interval():
    r = mean_ci([0.1, 0.2, 0.3])
    # sd = 0.1, t(0.975, 2) = 4.302653 -> half-width 0.1 * 4.302653 / sqrt(3)
    assert r["mean"] == pytest.approx(0.2)
    assert r["ci95"] == pytest.approx(0.1 * 4.302653 / math.sqrt(3), rel=1e-5)
    assert mean_ci([0.5])["ci95"] == 0.0
    agg = aggregate_seeds([{"ndcg@10": 0.1}, {"ndcg@10": 0.3}])
    assert agg["ndcg@10"]["mean"] == pytest.approx(0.2)


def test_paired_test_detects_a_consistent_difference():
    rng = np.random.default_rng(0)
    b = rng.random(200)
    a = b + 0.05 + rng.normal(0, 0.01, 200)
    t = paired_test(a, b)
    assert t.mean_diff == pytest.approx(0.05, abs=0.005)
    assert t.t_pvalue < 1e-6 and t.wilcoxon_pvalue < 1e-6
    same = paired_test(b, b)
    assert same.t_pvalue == 1.0
    with pytest.raises(ValueError):
        paired_test(a[:10], b)
