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
    # one score matrix for every batch of this pass (Recommender.score_into); any module with ``score`` also works
    buffer = None
    for _, batch in iterate_example_batches(examples, protocol.batch_size, max_len, order=rows[by_length]):
        if not hasattr(model, "score_into"):
            scores = model.score(batch)
        else:
            if buffer is None:
                buffer = torch.empty(min(protocol.batch_size, len(rows)), model.n_items + 1)
            scores = model.score_into(batch, buffer)
        r = pessimistic_ranks(scores, batch["target"], batch["history"], protocol.mask_history)
        ranks[by_length[done : done + len(r)]] = r.numpy()
        done += len(r)
    model.train(was_training)
    return ranks


@torch.no_grad()
def rank_valid_and_test(
    model: torch.nn.Module, valid: Examples, test: Examples, protocol: EvalProtocol, max_len: int,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(rank_examples(valid), rank_examples(test))`` over the same ``rows``, with one encoder pass for both where
    it can: a leave-one-out test history is the validation history plus its target, so a causal model's state after
    the validation history sits one position before the end of the test history (``score_last_two_into``). Rows
    where that does not hold (another split, a history cut to ``max_len``, an empty validation history) and models
    without that method are ranked by ``rank_examples``. The ranks are those of two ``rank_examples`` calls
    (tests/test_evaluator_speed.py compares them on fixed models)."""
    rows = np.arange(len(valid)) if rows is None else np.asarray(rows)
    if not hasattr(model, "score_last_two_into") or protocol.mask_history or len(valid) != len(test):
        return rank_examples(model, valid, protocol, max_len, rows), rank_examples(model, test, protocol, max_len, rows)
    model_len = getattr(getattr(model, "config", None), "max_len", None)
    limit = min(max_len, model_len) if model_len else max_len
    test_len = np.array([len(test.histories[i]) for i in rows], dtype=np.int64)
    shared = np.array([
        2 <= n <= limit and test.histories[i][-1] == valid.targets[i] and len(valid.histories[i]) == n - 1
        and np.array_equal(test.histories[i][:-1], valid.histories[i])
        for i, n in zip(rows, test_len)], dtype=bool)
    valid_ranks = np.zeros(len(rows), dtype=np.int64)
    test_ranks = np.zeros(len(rows), dtype=np.int64)
    if (~shared).any():
        valid_ranks[~shared] = rank_examples(model, valid, protocol, max_len, rows[~shared])
        test_ranks[~shared] = rank_examples(model, test, protocol, max_len, rows[~shared])
    pos = np.flatnonzero(shared)
    if len(pos) == 0:
        return valid_ranks, test_ranks
    was_training = model.training
    model.eval()
    pos = pos[np.argsort(test_len[pos], kind="stable")]  # less padding, as in rank_examples
    width = min(protocol.batch_size, len(pos))
    buf_v, buf_t = torch.empty(width, model.n_items + 1), torch.empty(width, model.n_items + 1)
    done = 0
    for _, batch in iterate_example_batches(test, protocol.batch_size, max_len, order=rows[pos]):
        before, after = model.score_last_two_into(batch, buf_v, buf_t)
        take = pos[done : done + len(after)]
        valid_ranks[take] = pessimistic_ranks(before, torch.from_numpy(valid.targets[rows[take]])).numpy()
        test_ranks[take] = pessimistic_ranks(after, batch["target"]).numpy()
        done += len(after)
    model.train(was_training)
    return valid_ranks, test_ranks


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
