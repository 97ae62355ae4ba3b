"""Scoring a split with a recommender: full ranking over all items, per-row ranks, means and slices."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ..data.batching import iterate_example_batches
from ..data.dataset import Dataset, Examples
from .metrics import DEFAULT_KS, mean_metrics, metrics_from_ranks, pessimistic_ranks, slice_metrics


class EvalProtocol(BaseModel):
    """Everything that changes a number, in one declarative object printed (with its hash) beside every result."""

    model_config = ConfigDict(extra="forbid")

    candidates: str = "full"  # full ranking over all items; sampled modes must be named here
    ks: tuple[int, ...] = DEFAULT_KS
    mask_history: bool = False  # RecBole's sequential default: history items stay rankable
    tie_breaking: str = "pessimistic"
    select_metric: str = "ndcg@10"  # model selection on validation only
    batch_size: int = 512

    def describe(self, dataset: Dataset, max_len: int) -> dict[str, Any]:
        d = self.model_dump(mode="json") | {
            "split": dataset.protocol,
            "dataset_fingerprint": dataset.fingerprint(),
            "max_len": max_len,
        }
        d["hash"] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
        return d


@torch.no_grad()
def rank_examples(
    model: torch.nn.Module,
    examples: Examples,
    protocol: EvalProtocol,
    max_len: int,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """0-based pessimistic rank of every target (or of the given ``rows``) under ``model.score``."""
    if protocol.candidates != "full":
        raise ValueError(f"candidate mode '{protocol.candidates}' is not implemented; use 'full'")
    was_training = model.training
    model.eval()
    out = []
    for _, batch in iterate_example_batches(examples, protocol.batch_size, max_len, order=rows):
        scores = model.score(batch)
        out.append(pessimistic_ranks(scores, batch["target"], batch["history"], protocol.mask_history))
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def summarise(
    ranks: np.ndarray, examples: Examples, dataset: Dataset, protocol: EvalProtocol, with_slices: bool = True
) -> dict[str, Any]:
    result: dict[str, Any] = {"metrics": mean_metrics(ranks, protocol.ks), "n": int(len(ranks))}
    if with_slices:
        lengths = np.array([len(h) for h in examples.histories], dtype=np.int64)
        result["slices"] = slice_metrics(ranks, examples.targets, lengths, dataset.item_train_counts(), protocol.ks)
    return result


def per_row_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
    """One metric per evaluated row (for paired tests), e.g. ``per_row_metric(ranks, "ndcg@10")``."""
    k = int(metric.split("@")[1])
    return metrics_from_ranks(ranks, (k,))[metric]
