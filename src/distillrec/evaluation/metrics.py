"""Full-ranking metrics, slices, seed aggregation and paired tests.

Ranks are 0-based and pessimistic: an item tied with the target is counted as ranked above it, so a model that
gives every item the same score ranks every target last (no free hits from ties). Padding (column 0) is never
ranked. With one held-out target per row, HR@K = Recall@K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

DEFAULT_KS = (5, 10, 20)
COLD_BUCKETS = ((0, 0, "0"), (1, 4, "1-4"), (5, 19, "5-19"), (20, None, "20+"))
LENGTH_BUCKETS = ((1, 1, "1"), (2, 3, "2-3"), (4, 6, "4-6"), (7, 10, "7-10"), (11, None, "11+"))


def pessimistic_ranks(
    scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None, mask_history: bool = False
) -> torch.Tensor:
    """0-based rank of each target among items 1..n; ``scores`` is [B, n_items + 1] and is not modified.

    Rank = the number of other items 1..n scored >= the target (pessimistic ties). A NaN score never counts as
    above anything; a target whose own score is NaN or infinite is ranked last (``n_items``), as is, with
    ``mask_history``, a target that is in its own history (its items are removed from the ranking, which keeps the
    option honest for datasets with repeats).

    This is the evaluator's hot loop (a [B, n] compare-and-count per batch): the scores are not copied (unless
    history is masked), and the count runs over blocks of rows that stay in cache, summed in int32 (faster than one
    ``(scores >= t).sum(1)`` over the whole matrix; benchmarks/eval_paths.py), with identical results (``tests/test_metrics.py`` checks it
    against the direct formula).
    """
    scores = scores.detach()
    if scores.dtype != torch.float32:
        scores = scores.float()
    if mask_history and history is not None:
        scores = scores.clone()
        scores.scatter_(1, history, -torch.inf)
    n_items = scores.shape[1] - 1
    target_scores = scores.gather(1, targets.view(-1, 1).to(scores.device))
    last = ~torch.isfinite(target_scores.squeeze(1))  # NaN, -inf (masked or never scored) or +inf: ranked last
    counts = torch.empty(scores.shape[0], dtype=torch.int32, device=scores.device)
    block = _RANK_BLOCK_ROWS
    for s in range(0, scores.shape[0], block):
        # items 1..n only: column 0 (padding) is never ranked
        torch.sum(scores[s : s + block, 1:] >= target_scores[s : s + block], 1, dtype=torch.int32,
                  out=counts[s : s + block])
    ranks = counts.long() - 1  # the target counts itself
    return torch.where(last, torch.full_like(ranks, n_items), ranks)


_RANK_BLOCK_ROWS = 16  # rows per compare-and-count block: 16 x 12k floats = 0.8 MB, inside L2


def reference_pessimistic_ranks(
    scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None, mask_history: bool = False
) -> torch.Tensor:
    """The direct formula :func:`pessimistic_ranks` must equal (kept for the test that checks it)."""
    scores = scores.detach().float().clone()
    scores[torch.isnan(scores)] = -torch.inf
    scores[:, 0] = -torch.inf
    if mask_history and history is not None:
        scores.scatter_(1, history, -torch.inf)
        scores[:, 0] = -torch.inf
    target_scores = scores.gather(1, targets.view(-1, 1))
    ranks = (scores >= target_scores).sum(dim=1) - 1
    n_items = scores.shape[1] - 1
    return torch.where(torch.isinf(target_scores.squeeze(1)), torch.full_like(ranks, n_items), ranks)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-row HR/Recall, NDCG and MRR at each k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = (ranks < k).astype(np.float64)
        out[f"hr@{k}"] = hit
        out[f"recall@{k}"] = hit
        out[f"ndcg@{k}"] = hit / np.log2(ranks + 2.0)
        out[f"mrr@{k}"] = hit / (ranks + 1.0)
    return out


def mean_metrics(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    if len(ranks) == 0:
        return {}
    return {name: float(v.mean()) for name, v in metrics_from_ranks(ranks, ks).items()}


def _bucket(values: np.ndarray, buckets) -> dict[str, np.ndarray]:
    return {
        label: (values >= lo) & (values <= (hi if hi is not None else np.inf)) for lo, hi, label in buckets
    }


def slice_metrics(
    ranks: np.ndarray,
    targets: np.ndarray,
    history_lengths: np.ndarray,
    train_counts: np.ndarray,
    ks: tuple[int, ...] = DEFAULT_KS,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics for cold-start targets (by training frequency) and by history length; each bucket carries its count."""
    out: dict[str, dict[str, dict[str, float]]] = {"target_train_frequency": {}, "history_length": {}}
    for name, values, buckets in (
        ("target_train_frequency", train_counts[targets], COLD_BUCKETS),
        ("history_length", history_lengths, LENGTH_BUCKETS),
    ):
        for label, mask in _bucket(values, buckets).items():
            m = mean_metrics(ranks[mask], ks)
            m["n"] = int(mask.sum())
            out[name][label] = m
    return out


def mean_ci(values, confidence: float = 0.95) -> dict[str, float]:
    """Mean and the half-width of its Student-t confidence interval over seeds (half-width 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "ci95": 0.0, "n": len(v)}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "ci95": half, "n": len(v)}


def aggregate_seeds(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "ci95", "n"}} over the runs of several seeds."""
    keys = sorted(set().union(*[set(m) for m in per_seed])) if per_seed else []
    return {k: mean_ci([m[k] for m in per_seed if k in m]) for k in keys}


@dataclass
class PairedTest:
    metric: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    t_pvalue: float
    wilcoxon_pvalue: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def paired_test(a: np.ndarray, b: np.ndarray, metric: str = "ndcg@10") -> PairedTest:
    """Paired t-test and Wilcoxon signed-rank test on per-row metric values of two runs on the same rows."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same rows in both runs, got {a.shape} and {b.shape}")
    diff = a - b
    if np.allclose(diff, 0):
        t_p = w_p = 1.0
    else:
        t_p = float(stats.ttest_rel(a, b).pvalue)
        w_p = float(stats.wilcoxon(a, b, zero_method="wilcox").pvalue)
    return PairedTest(metric, len(a), float(a.mean()), float(b.mean()), float(diff.mean()), t_p, w_p)
