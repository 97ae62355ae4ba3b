"""The one canonical dataset every loader produces and every model, method and evaluator consumes.

Internal item ids run 1..n_items; id 0 is padding everywhere (feature rows, embeddings, scores).

A dataset holds:
- ``items``: an :class:`ItemTable` (external ids, text fields, optional image paths, optional feature matrices);
- ``train``: training sequences (one per user or session); every position k >= 1 of a sequence is a next-item
  training example ``seq[:k] -> seq[k]``;
- ``valid`` and ``test``: :class:`Examples`, explicit ``history -> target`` rows;
- ``protocol``: a plain dict describing how the split was made (recorded beside every result).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError  # noqa: F401  (re-exported: the data layer's error)


@dataclass
class LoadReport:
    """Counts of rows a loader skipped or changed, so no row is dropped silently."""

    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def summary(self) -> str:
        if not self.skipped and not self.notes:
            return "no rows skipped"
        parts = [f"{n} {reason}" for reason, n in sorted(self.skipped.items())]
        return "; ".join(parts + self.notes)


@dataclass
class ItemTable:
    """Items 1..n (index 0 = padding). ``ids[i]`` is the external id of internal item ``i + 1``."""

    ids: list[str]
    text: dict[str, list[str]] = field(default_factory=dict)  # field name -> one string per item
    image_paths: list[str | None] | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [n_items + 1, d], row 0 = 0

    @property
    def n_items(self) -> int:
        return len(self.ids)

    def index(self) -> dict[str, int]:
        """External id -> internal id (1-based)."""
        return {ext: i + 1 for i, ext in enumerate(self.ids)}

    def item_text(self, item: int, fields: list[str] | None = None) -> str:
        """All (or the named) text fields of internal item ``item`` joined into one string."""
        names = fields or list(self.text)
        return ". ".join(self.text[f][item - 1] for f in names if self.text[f][item - 1])

    def add_features(self, name: str, rows: np.ndarray, *, source: str = "features") -> None:
        """Attach a matrix with one row per item (``[n_items, d]``) or with the padding row (``[n_items + 1, d]``)."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise DataError(f"{source}: feature '{name}' must be a 2-D matrix, got shape {rows.shape}")
        if rows.shape[0] == self.n_items:
            rows = np.vstack([np.zeros((1, rows.shape[1]), np.float32), rows])
        if rows.shape[0] != self.n_items + 1:
            raise DataError(
                f"{source}: feature '{name}' has {rows.shape[0]} rows but the item table has {self.n_items} items; "
                "give one row per item in item-table order"
            )
        self.features[name] = rows


@dataclass
class Examples:
    """``history -> target`` rows for evaluation (or prefix-style training)."""

    histories: list[np.ndarray]
    targets: np.ndarray  # int64 [n]
    users: list[str] | None = None  # user or session id per row (for per-user paired tests)

    def __len__(self) -> int:
        return len(self.targets)

    @staticmethod
    def from_sequences(sequences: list[np.ndarray], users: list[str] | None = None) -> "Examples":
        """Every prefix of every sequence: ``seq[:k] -> seq[k]`` for k >= 1."""
        hist, tgt, us = [], [], []
        for j, seq in enumerate(sequences):
            for k in range(1, len(seq)):
                hist.append(seq[:k])
                tgt.append(int(seq[k]))
                if users is not None:
                    us.append(users[j])
        return Examples(hist, np.asarray(tgt, dtype=np.int64), us if users is not None else None)


@dataclass
class Dataset:
    name: str
    items: ItemTable
    train: list[np.ndarray]  # int64 arrays of internal ids
    valid: Examples
    test: Examples
    train_users: list[str] | None = None
    train_timestamps: list[np.ndarray] | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def n_items(self) -> int:
        return self.items.n_items

    def train_examples(self) -> Examples:
        return Examples.from_sequences(self.train, self.train_users)

    def item_train_counts(self) -> np.ndarray:
        """How often each item occurs in the training sequences, ``[n_items + 1]`` (index 0 = padding = 0)."""
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        for seq in self.train:
            np.add.at(counts, seq, 1)
        counts[0] = 0
        return counts

    def fingerprint(self) -> str:
        """A short hash of the split, so results say exactly which data they were computed on."""
        h = hashlib.sha256()
        h.update(json.dumps(self.protocol, sort_keys=True, default=str).encode())
        h.update(str(self.n_items).encode())
        for part in (self.train, self.valid.histories, self.test.histories):
            for s in part:
                h.update(np.asarray(s, dtype=np.int64).tobytes())
                h.update(b"|")
        h.update(self.valid.targets.tobytes())
        h.update(self.test.targets.tobytes())
        return h.hexdigest()[:12]

    def statistics(self) -> dict[str, Any]:
        lengths = np.array([len(s) for s in self.train]) if self.train else np.zeros(0)
        n_inter = int(lengths.sum())
        return {
            "name": self.name,
            "items": self.n_items,
            "train_sequences": len(self.train),
            "train_interactions": n_inter,
            "avg_train_length": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
            "valid_examples": len(self.valid),
            "test_examples": len(self.test),
            "text_fields": list(self.items.text),
            "features": {k: list(v.shape) for k, v in self.items.features.items()},
            "images": sum(p is not None for p in self.items.image_paths) if self.items.image_paths else 0,
            "density": round(n_inter / max(1, len(self.train) * self.n_items), 6),
            "skipped": dict(self.report.skipped),
        }


def leave_one_out(
    name: str,
    items: ItemTable,
    sequences: list[np.ndarray],
    users: list[str],
    *,
    timestamps: list[np.ndarray] | None = None,
    protocol: dict[str, Any] | None = None,
    report: LoadReport | None = None,
) -> Dataset:
    """Per-user leave-one-out: last item = test target, second-last = valid target, the rest = training.

    Users with fewer than 3 items cannot give all three parts; they are counted in the report and skipped.
    """
    report = report or LoadReport()
    train, tr_users, tr_ts, vh, vt, th, tt, eu = [], [], [], [], [], [], [], []
    for j, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < 3:
            report.skip("users with fewer than 3 interactions (leave-one-out needs 3)")
            continue
        train.append(seq[:-2])
        tr_users.append(users[j])
        if timestamps is not None:
            tr_ts.append(np.asarray(timestamps[j])[:-2])
        vh.append(seq[:-2])
        vt.append(seq[-2])
        th.append(seq[:-1])
        tt.append(seq[-1])
        eu.append(users[j])
    proto = {"split": "leave_one_out", "order": "chronological"}
    proto.update(protocol or {})
    return Dataset(
        name=name,
        items=items,
        train=train,
        valid=Examples(vh, np.asarray(vt, dtype=np.int64), eu),
        test=Examples(th, np.asarray(tt, dtype=np.int64), list(eu)),
        train_users=tr_users,
        train_timestamps=tr_ts if timestamps is not None else None,
        protocol=proto,
        report=report,
    )
