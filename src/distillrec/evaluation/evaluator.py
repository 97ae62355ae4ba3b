"""Scoring a split with a recommender: full ranking over all items, per-row ranks, means and slices.

The sampled-candidate protocol (MLLM-MSR's 1 positive : 20 negatives) is :mod:`distillrec.evaluation.candidates`;
:func:`sampled_protocol` is its description, with a hash, to print beside every sampled number."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ..data.batching import iterate_example_batches
from ..data.dataset import Dataset, Examples
from .candidates import CandidateSet
from .metrics import DEFAULT_KS, mean_metrics, metrics_from_ranks, pessimistic_ranks, slice_metrics


class EvalProtocol(BaseModel):
    """Everything that changes a number, in one declarative object printed (with its hash) beside every result."""

    model_config = ConfigDict(extra="forbid")

    # "full": every item 1..n is ranked (the only mode of `rank_examples` and of run folders). The sampled mode of
    # MLLM-MSR (1 positive : n negatives per user) lives in `evaluation.candidates`: a saved CandidateSet shared by
    # every model, described by `sampled_protocol(cands)` (mode "sampled", printed beside every sampled result).
    candidates: str = "full"
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


def sampled_protocol(cands: CandidateSet) -> dict[str, Any]:
    """The description of a sampled-candidate evaluation, labelled as such, with a hash over its settings and the
    candidate items themselves: two sampled results are comparable only when their hashes are equal (model settings
    such as ``max_len`` are not part of it, so an LLM and a recommender on the same file share the hash)."""
    d: dict[str, Any] = {
        "candidates": f"sampled 1+{cands.n_negatives}",
        "label": (f"SAMPLED: 1 target + {cands.n_negatives} unseen negatives per row (seed {cands.seed}), "
                  "not full ranking"),
        "split": cands.split,
        "n_negatives": int(cands.n_negatives),
        "seed": int(cands.seed),
        "n": len(cands.rows),
        "dataset_fingerprint": cands.dataset_fingerprint,
        "tie_breaking": "pessimistic",
        "items_hash": hashlib.sha256(np.ascontiguousarray(cands.rows, np.int64).tobytes()
                                     + np.ascontiguousarray(cands.items, np.int64).tobytes()).hexdigest()[:12],
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
    rows = np.arange(len(examples)) if rows is None else np.asarray(rows)
    # score rows in order of history length (less padding), then put the ranks back in row order
    lengths = np.array([min(len(examples.histories[i]), max_len) for i in rows], dtype=np.int64)
    by_length = np.argsort(lengths, kind="stable")
    ranks = np.zeros(len(rows), dtype=np.int64)
    done = 0
    for _, batch in iterate_example_batches(examples, protocol.batch_size, max_len, order=rows[by_length]):
        scores = model.score(batch)
        r = pessimistic_ranks(scores, batch["target"], batch["history"], protocol.mask_history)
        ranks[by_length[done : done + len(r)]] = r.numpy()
        done += len(r)
    model.train(was_training)
    return ranks


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
