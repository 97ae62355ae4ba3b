"""The sampled-candidate protocol of MLLM-MSR (1 positive : 20 negatives per user), and the re-ranker mode.

Every model is scored on the very same candidates: a :class:`CandidateSet` is sampled once from a dataset split
(:func:`sample_candidates`), saved (safetensors + JSON metadata, tied to the dataset's fingerprint), and then a
classic recommender (:func:`score_candidates`, through ``Recommender.score``) and the LLM recommender (its yes/no
scores) each produce a score matrix ``[n, 1 + n_negatives]`` whose column 0 is the held-out target.
:func:`candidate_metrics` turns a score matrix into HR/NDCG/MRR@k over the candidates, the per-user AUC and the pooled
AUC of MLLM-MSR's official code.

**Sampled numbers are not full-ranking numbers.** They are far higher, depend on the negatives drawn and are only
comparable between models scored on the same file; every result must carry the description of
:func:`~distillrec.evaluation.evaluator.sampled_protocol` beside it.

Ranks are 0-based and pessimistic as everywhere in this project: a negative tied with the target counts as ranked
above it (a constant scorer ranks every target last, rank C - 1); a NaN score counts as -inf.

Two AUCs:

- ``auc`` (per row, then averaged): the fraction of a user's negatives scored strictly below the positive, ties
  counting 1/2 -- a property of the ranking each user sees, unaffected by how scores compare across users.
- ``auc_pooled``: one ROC AUC over every (row, candidate) pair, label 1 for column 0, as MLLM-MSR's official code
  computes it (``sklearn.metrics.roc_auc_score`` on the flattened predictions). It mixes users: a positive of one user
  is compared with the negatives of every other user, so it rewards scores calibrated across users (yes-probabilities
  of an LLM) and is not a ranking metric. A recommender's logits are not calibrated across histories; report
  ``auc`` for ranking quality and ``auc_pooled`` only to compare with the paper.

Re-ranker mode (:func:`top_n_items`, :func:`rerank_ranks`): a base recommender ranks all items, a re-ranker (an LLM)
reorders its top-n; the target's rank is its pessimistic rank among the n under the re-ranker when the base model put
it in the top-n, else its full base rank (>= n). These are full-ranking ranks: they feed
:func:`~distillrec.evaluation.metrics.metrics_from_ranks` unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from ..data.batching import iterate_example_batches
from ..data.dataset import Dataset, Examples
from ..errors import ConfigError, DataError
from ..files import atomic_save_tensors
from .metrics import metrics_from_ranks, pessimistic_ranks

SPLITS = ("valid", "test")
FORMAT = "distillrec-candidates"
FORMAT_VERSION = 1
_META_KEY = "distillrec_candidates"
_SPLIT_TAG = {"valid": 1, "test": 2}  # part of every random seed: valid and test draw independently
_RESAMPLE = "sample again with `distillrec candidates DATASET_CONFIG --out FILE`"


@dataclass
class CandidateSet:
    """One sampled candidate list per selected row of ``dataset.<split>``: column 0 the row's target, then
    ``n_negatives`` items the user never interacted with."""

    split: str  # "valid" or "test" (which Examples of the Dataset)
    rows: np.ndarray  # int64 [n], row indices into dataset.<split>
    items: np.ndarray  # int64 [n, 1 + n_negatives]; column 0 = that row's target, then the negatives
    seed: int
    n_negatives: int
    dataset_fingerprint: str  # Dataset.fingerprint()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_candidates(self) -> int:
        return 1 + self.n_negatives

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "split": self.split, "seed": int(self.seed),
                "n_negatives": int(self.n_negatives), "dataset_fingerprint": self.dataset_fingerprint,
                "n": len(self.rows)}

    def save(self, path: str | Path) -> Path:
        """One safetensors file (``rows``, ``items``) with the JSON metadata, written atomically; no pickle."""
        tensors = {"rows": torch.from_numpy(np.ascontiguousarray(self.rows, dtype=np.int64)),
                   "items": torch.from_numpy(np.ascontiguousarray(self.items, dtype=np.int64))}
        return atomic_save_tensors(path, tensors, {_META_KEY: json.dumps(self.meta())})

    @classmethod
    def load(cls, path: str | Path, dataset: Dataset | None = None) -> CandidateSet:
        """Read a file written by :meth:`save`; with ``dataset``, also check that it was sampled from that dataset."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"candidate file '{path}' not found" + (" (it is a folder)" if path.is_dir() else "")
                              + f"; {_RESAMPLE}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
            rows, items = tensors["rows"].numpy().astype(np.int64), tensors["items"].numpy().astype(np.int64)
            cands = cls(str(meta["split"]), rows, items, int(meta["seed"]), int(meta["n_negatives"]),
                        str(meta["dataset_fingerprint"]))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
            raise DataError(f"{path}: not a readable distillrec candidate file ({type(e).__name__}: {e}); "
                            f"{_RESAMPLE}") from None
        if (cands.split not in SPLITS or rows.ndim != 1 or items.ndim != 2 or len(items) != len(rows)
                or items.shape[1] != cands.n_candidates):
            raise DataError(f"{path}: inconsistent candidate file (split {cands.split!r}, rows {list(rows.shape)}, "
                            f"items {list(items.shape)}, n_negatives {cands.n_negatives}); {_RESAMPLE}")
        if dataset is not None:
            cands.check(dataset, source=str(path))
        return cands

    def check(self, dataset: Dataset, source: str = "candidate set") -> None:
        """A DataError (naming ``source``) unless these candidates were sampled from ``dataset``."""
        have = dataset.fingerprint()
        if have != self.dataset_fingerprint:
            raise DataError(f"{source}: sampled from dataset fingerprint {self.dataset_fingerprint}, but "
                            f"'{dataset.name}' has fingerprint {have} (another split or version of the data); "
                            f"{_RESAMPLE}")
        ex = getattr(dataset, self.split)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(ex)
                               or not np.array_equal(ex.targets[self.rows], self.items[:, 0])):
            raise DataError(f"{source}: its rows or targets do not match dataset.{self.split} of '{dataset.name}'; "
                            f"{_RESAMPLE}")

    def examples(self, dataset: Dataset) -> Examples:
        """The selected rows' :class:`Examples` (histories, targets, users), in the order of ``rows``."""
        ex = getattr(dataset, self.split)
        users = [ex.users[i] for i in self.rows] if ex.users is not None else None
        return Examples([ex.histories[i] for i in self.rows], ex.targets[self.rows].copy(), users)


# ------------------------------------------------------------------------------------------------------- sampling
def _user_items(dataset: Dataset, users: set[str]) -> dict[str, np.ndarray]:
    """Every item each of ``users`` interacted with anywhere in the dataset (train, valid and test)."""
    parts: dict[str, list[np.ndarray]] = {u: [] for u in users}
    if dataset.train_users is not None:
        for u, seq in zip(dataset.train_users, dataset.train):
            if u in parts:
                parts[u].append(np.asarray(seq, dtype=np.int64))
    for ex in (dataset.valid, dataset.test):
        if ex.users is None:
            continue
        for i, u in enumerate(ex.users):
            if u in parts:
                parts[u].append(np.asarray(ex.histories[i], dtype=np.int64))
                parts[u].append(ex.targets[i : i + 1])
    return {u: np.unique(np.concatenate(p)) if p else np.zeros(0, np.int64) for u, p in parts.items()}


def sample_candidates(
    dataset: Dataset,
    split: str = "test",
    *,
    n_negatives: int = 20,
    seed: int = 0,
    max_users: int | None = None,
    rows: np.ndarray | list[int] | None = None,
) -> CandidateSet:
    """Sample ``n_negatives`` negatives for each selected row of ``dataset.<split>``.

    Rows: ``rows`` when given (in that order), else every row, or ``max_users`` of them drawn at random by ``seed``
    (sorted). Negatives: uniform without replacement among the items 1..n_items the user never interacted with -- not
    in the row's history, not its target and, when ``Examples.users`` is set, nowhere in that user's train, valid or
    test sequence. Each row's negatives come from its own random stream (``seed``, split, row index), so a row gets
    the same negatives whichever other rows are selected. Deterministic given (dataset, split, seed, n_negatives,
    rows).
    """
    if split not in SPLITS:
        raise ConfigError(f"split '{split}': use valid or test")
    if n_negatives < 1:
        raise ConfigError(f"n_negatives={n_negatives}: give at least one negative per row")
    ex: Examples = getattr(dataset, split)
    n_rows = len(ex)
    if rows is not None:
        if max_users is not None:
            raise ConfigError("give rows or max_users, not both")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
            raise ConfigError(f"rows: indices must lie in 0..{n_rows - 1} (dataset.{split} has {n_rows} rows)")
        if len(np.unique(rows)) != len(rows):
            raise ConfigError("rows: an index is repeated; give each row once")
    elif max_users is not None and max_users < n_rows:
        if max_users < 1:
            raise ConfigError(f"max_users={max_users}: give at least 1")
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_TAG[split], 0]))
        rows = np.sort(rng.choice(n_rows, size=max_users, replace=False)).astype(np.int64)
    else:
        rows = np.arange(n_rows, dtype=np.int64)

    n_items = dataset.n_items
    others = _user_items(dataset, {ex.users[i] for i in rows}) if ex.users is not None else {}
    items = np.zeros((len(rows), 1 + n_negatives), dtype=np.int64)
    for j, r in enumerate(rows):
        target = int(ex.targets[r])
        seen_parts = [np.asarray(ex.histories[r], dtype=np.int64), np.array([target], dtype=np.int64)]
        if ex.users is not None:
            seen_parts.append(others[ex.users[r]])
        seen = np.unique(np.concatenate(seen_parts))
        seen = seen[(seen >= 1) & (seen <= n_items)]
        unseen = n_items - len(seen)
        if unseen < n_negatives:
            who = f" (user {ex.users[r]})" if ex.users is not None else ""
            raise ConfigError(f"dataset.{split} row {r}{who} has only {unseen} items it never interacted with, fewer "
                              f"than n_negatives={n_negatives}; lower --negatives or select other rows")
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_TAG[split], 1, int(r)]))
        # the first m of a uniform random order of 1..n_items hold at least n_negatives unseen items (at most
        # len(seen) of them are seen); the unseen ones among them, in that order, are a uniform sample without
        # replacement of the unseen items
        draw = rng.choice(n_items, size=min(n_items, n_negatives + len(seen)), replace=False).astype(np.int64) + 1
        draw = draw[~np.isin(draw, seen)]
        items[j, 0] = target
        items[j, 1:] = draw[:n_negatives]
    return CandidateSet(split, rows, items, int(seed), int(n_negatives), dataset.fingerprint())


# ----------------------------------------------------------------------------------------------- ranks and metrics
def _as_matrix(scores: Any) -> np.ndarray:
    if torch.is_tensor(scores):
        scores = scores.detach().float().cpu().numpy()
    s = np.array(scores, dtype=np.float64)  # a copy: the caller's scores are never changed
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"candidate scores must be [n, C] with C >= 2 (column 0 = the target), got {list(s.shape)}")
    s[np.isnan(s)] = -np.inf
    return s


def candidate_ranks(scores: Any) -> np.ndarray:
    """Pessimistic 0-based rank of column 0 among the C candidates of each row (a tied negative counts above it;
    NaN = -inf), int64 [n]."""
    s = _as_matrix(scores)
    return (s[:, 1:] >= s[:, :1]).sum(axis=1).astype(np.int64)


def per_row_candidate_metrics(scores: Any, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Per row: ``auc`` (fraction of negatives scored strictly below the positive, ties 1/2) and ``hr@k``,
    ``mrr@k``, ``ndcg@k`` for every k in ``ks`` (pessimistic ranks among the candidates)."""
    s = _as_matrix(scores)
    pos, neg = s[:, :1], s[:, 1:]
    out = {"auc": ((neg < pos).sum(axis=1) + 0.5 * (neg == pos).sum(axis=1)) / neg.shape[1]}
    ranks = (neg >= pos).sum(axis=1)
    full = metrics_from_ranks(ranks, tuple(ks))
    for k in ks:
        for name in ("hr", "mrr", "ndcg"):
            out[f"{name}@{k}"] = full[f"{name}@{k}"]
    return out


def pooled_auc(scores: Any) -> float:
    """ROC AUC over all (row, candidate) pairs with label 1 for column 0 (ties 1/2): MLLM-MSR's official AUC,
    equal to ``sklearn.metrics.roc_auc_score(labels.ravel(), scores.ravel())``. It mixes users (see the module)."""
    s = _as_matrix(scores)
    labels = np.zeros(s.shape, dtype=bool)
    labels[:, 0] = True
    flat, lab = s.ravel(), labels.ravel()
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(flat)  # average ranks: ties count 1/2 (Mann-Whitney U)
    return float((r[lab].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def candidate_metrics(scores: Any, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Means of :func:`per_row_candidate_metrics`, ``auc_pooled`` (:func:`pooled_auc`: mixes users, so only
    meaningful for scores calibrated across users) and ``n`` (rows)."""
    per_row = per_row_candidate_metrics(scores, ks)
    n = len(per_row["auc"])
    out = {name: float(v.mean()) if n else float("nan") for name, v in per_row.items()}
    out["auc_pooled"] = pooled_auc(scores) if n else float("nan")
    out["n"] = n
    return out


# --------------------------------------------------------------------------------------------- scoring with a model
def _resolve_rows(examples: Examples, cands: CandidateSet) -> tuple[Examples, np.ndarray]:
    """(examples, row indices into them) for the candidate rows: ``examples`` is either the selected rows'
    Examples (``cands.examples(dataset)``, row i = candidate row i) or the whole split (indexed by ``cands.rows``)."""
    targets = cands.items[:, 0]
    if len(examples) == len(cands.rows) and np.array_equal(examples.targets, targets):
        return examples, np.arange(len(cands.rows), dtype=np.int64)
    rows = np.asarray(cands.rows, dtype=np.int64)
    if len(rows) == 0 or (rows.max() < len(examples) and np.array_equal(examples.targets[rows], targets)):
        return examples, rows
    raise DataError(f"the examples ({len(examples)} rows) are neither dataset.{cands.split} of the candidate set's "
                    f"dataset nor its selected rows ({len(rows)}): targets differ; {_RESAMPLE}")


@torch.no_grad()
def _score_rows(model: torch.nn.Module, examples: Examples, rows: np.ndarray, max_len: int, batch_size: int,
                consume) -> None:
    """``consume(positions, scores)`` for every batch of full score rows [B, n_items + 1], rows scored in order of
    history length (less padding); ``positions`` index into ``rows``."""
    was_training = model.training
    model.eval()
    try:
        lengths = np.array([min(len(examples.histories[i]), max_len) for i in rows], dtype=np.int64)
        by_length = np.argsort(lengths, kind="stable")
        done = 0
        for _, batch in iterate_example_batches(examples, batch_size, max_len, order=rows[by_length]):
            b = len(batch["target"])
            consume(by_length[done : done + b], model.score(batch), batch)
            done += b
    finally:
        model.train(was_training)


def score_candidates(
    model: torch.nn.Module, examples: Examples, cands: CandidateSet, max_len: int, batch_size: int = 256
) -> np.ndarray:
    """float32 [n, C]: ``model.score`` on each selected row's history, gathered at ``cands.items`` (column 0 = the
    target). ``examples``: the split's Examples (``dataset.test``) or the selected rows' (``cands.examples(ds)``)."""
    examples, rows = _resolve_rows(examples, cands)
    out = np.zeros(cands.items.shape, dtype=np.float32)

    def consume(pos: np.ndarray, scores: torch.Tensor, _batch: dict) -> None:
        idx = torch.from_numpy(cands.items[pos]).to(scores.device)
        out[pos] = scores.detach().float().gather(1, idx).cpu().numpy()

    _score_rows(model, examples, rows, max_len, batch_size, consume)
    return out


def top_n_items(
    model: torch.nn.Module, examples: Examples, rows: np.ndarray | list[int] | None, n: int, max_len: int,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-n items under ``model.score`` (int64 [len(rows), n], best first; padding never included; ties
    by item id ascending; NaN = -inf) and its target's pessimistic full rank (int64 [len(rows)], history not
    masked). ``rows`` index into ``examples`` (None: all)."""
    rows = np.arange(len(examples), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    top = np.zeros((len(rows), n), dtype=np.int64)
    ranks = np.zeros(len(rows), dtype=np.int64)
    checked = False

    def consume(pos: np.ndarray, scores: torch.Tensor, batch: dict) -> None:
        nonlocal checked
        scores = scores.detach().float().cpu()
        if not checked:
            if not 1 <= n <= scores.shape[1] - 1:
                raise ConfigError(f"top n={n}: give 1 <= n <= {scores.shape[1] - 1} (the number of items)")
            checked = True
        s = scores[:, 1:].clone()
        s[torch.isnan(s)] = -torch.inf
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :n]  # stable: ties by id ascending
        top[pos] = order.numpy() + 1
        ranks[pos] = pessimistic_ranks(scores, batch["target"]).numpy()

    if len(rows):
        _score_rows(model, examples, rows, max_len, batch_size, consume)
    return top, ranks


def rerank_ranks(
    top_items: np.ndarray, base_ranks: np.ndarray, targets: np.ndarray, rerank_scores: Any
) -> np.ndarray:
    """Full-ranking ranks of the re-ranker mode: a target inside the base model's top-n (``top_items`` [m, n]) gets
    its pessimistic rank among the n by ``rerank_scores`` [m, n] (aligned with ``top_items``; NaN = -inf); a target
    outside keeps its base full rank (``base_ranks``, >= n). Feed the result to ``metrics_from_ranks``."""
    top = np.asarray(top_items, dtype=np.int64)
    base = np.asarray(base_ranks, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    s = _as_matrix(rerank_scores) if len(top) else np.zeros(top.shape)
    if top.ndim != 2 or s.shape != top.shape or base.shape != (len(top),) or targets.shape != (len(top),):
        raise ValueError(f"rerank_ranks: top_items {list(top.shape)}, rerank_scores {list(s.shape)}, base_ranks "
                         f"{list(base.shape)} and targets {list(targets.shape)} must describe the same [m, n] rows")
    n = top.shape[1]
    hit = top == targets[:, None]
    inside = hit.any(axis=1)
    if np.any(base[~inside] < n):
        raise ValueError(f"rerank_ranks: a target outside the top-{n} has a base rank below {n}; top_items and "
                         "base_ranks must come from the same scores (top_n_items)")
    out = base.copy()
    if inside.any():
        rows = np.where(inside)[0]
        col = hit[rows].argmax(axis=1)
        own = s[rows, col][:, None]
        out[rows] = (s[rows] >= own).sum(axis=1) - 1
    return out
