"""Knowledge distillation from cached teacher logits: the trainer's ``train.teacher`` hook (off by default).

A teacher-logits file (safetensors, written by :meth:`TeacherLogits.save`) holds, for ``N`` training rows:

* ``rows`` int64 ``[N]``: the index of a training sequence in ``dataset.train``;
* ``positions`` int64 ``[N]``: the row's target is ``train[row][position]`` (``position >= 1``), its history
  ``train[row][:position]``;
* ``candidates`` int64 ``[N, C]``: the items the teacher scored, **column 0 = the target**, no padding, no repeats;
* ``logits`` float32 ``[N, C]``: the teacher's logits over those candidates;

and in its metadata the kind, the format and the dataset fingerprint (a file made on other data is a DataError).

With ``train.teacher: {path, weight, temperature, weighting}`` in a run config, every training batch adds, for the
file's rows whose target the batch trains on (each row once per epoch: the causal window or prefix row holding its
target), the term

    weight * sum_s w_s * T^2 * KL( softmax(z_teacher_s / T) || softmax(z_model_s / T) )

where ``z_model_s`` are the model's own scores (``Recommender.score`` on the row's history, the last ``max_len``
items) gathered at the row's candidates, and the weights have no parameters:

    confidence:  w_s = q_s / sum_{b in batch} q_b,   q_s = softmax(z_teacher_s)[target]   (the teacher's confidence)
    uniform:     w_s = 1 / (rows in the batch)

The model, its checkpoints, evaluation and serving are untouched: a distilled run folder is a plain run folder whose
``config.yaml`` names its teacher. ``weight: 0`` skips the hook, so it trains exactly the plain model. One process
only (DDP runs are refused).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batching import pad_histories
from ..data.dataset import Dataset
from ..errors import ConfigError, DataError
from ..files import atomic_save_tensors

KIND = "distillrec.teacher_logits"
FORMAT = 1


# ------------------------------------------------------------------------------------------------------ the losses
def kd_weights(teacher_logits: torch.Tensor, weighting: str = "confidence", target_col: int = 0) -> torch.Tensor:
    """Per-row weights ``[B]`` summing to 1: the teacher's softmax probability of the target (column
    ``target_col``), normalised over the batch (``confidence``), or ``1/B`` (``uniform``). No parameters, no
    gradient."""
    t = teacher_logits.detach().float()
    if weighting == "uniform":
        return torch.full((t.shape[0],), 1.0 / max(1, t.shape[0]), device=t.device)
    if weighting != "confidence":
        raise ValueError(f"weighting '{weighting}': use confidence or uniform")
    q = torch.softmax(t, dim=-1)[:, target_col]
    return q / q.sum().clamp(min=1e-12)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``KL(softmax(teacher/T) || softmax(student/T))`` ``[B]``; the gradient flows to the student only."""
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    log_pt = F.log_softmax(t, dim=-1)
    return (log_pt.exp() * (log_pt - F.log_softmax(s, dim=-1))).sum(-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            weights: torch.Tensor) -> torch.Tensor:
    """``sum_s w_s * T^2 * KL(p_teacher^T || p_student^T)`` (the weights from :func:`kd_weights`)."""
    return (weights * kd_kl(student_logits, teacher_logits, temperature)).sum() * temperature ** 2


# ------------------------------------------------------------------------------------------------------- the file
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TeacherLogits:
    rows: np.ndarray
    positions: np.ndarray
    candidates: np.ndarray
    logits: np.ndarray
    dataset_fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)  # free-form provenance (which teacher, which round ...)

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.positions = np.asarray(self.positions, dtype=np.int64)
        self.candidates = np.asarray(self.candidates, dtype=np.int64)
        self.logits = np.asarray(self.logits, dtype=np.float32)
        n = len(self.rows)
        if self.positions.shape != (n,) or self.candidates.ndim != 2 or self.candidates.shape[0] != n \
                or self.logits.shape != self.candidates.shape:
            raise DataError(f"teacher logits: rows {list(self.rows.shape)}, positions {list(self.positions.shape)}, "
                            f"candidates {list(self.candidates.shape)} and logits {list(self.logits.shape)} must "
                            "describe the same [N, C] rows")

    def __len__(self) -> int:
        return len(self.rows)

    def save(self, path: str | Path) -> Path:
        meta = {"kind": KIND, "format": str(FORMAT), "dataset_fingerprint": self.dataset_fingerprint,
                "meta": json.dumps(self.meta)}
        return atomic_save_tensors(path, {"rows": torch.from_numpy(self.rows),
                                          "positions": torch.from_numpy(self.positions),
                                          "candidates": torch.from_numpy(self.candidates),
                                          "logits": torch.from_numpy(self.logits)}, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, dataset: Dataset | None = None) -> TeacherLogits:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"train.teacher.path: '{path}' not found; give a teacher-logits file (written by "
                              "TeacherLogits.save, e.g. by `distillrec method llmd4rec`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k).numpy() for k in f.keys()}
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise DataError(f"{path}: not a safetensors teacher-logits file ({e}); write it with "
                            "TeacherLogits.save") from None
        if meta.get("kind") != KIND:
            raise DataError(f"{path}: metadata kind {meta.get('kind')!r} is not {KIND!r}; write the file with "
                            "TeacherLogits.save")
        missing = [k for k in ("rows", "positions", "candidates", "logits") if k not in tensors]
        if missing:
            raise DataError(f"{path}: tensors {missing} missing; write the file with TeacherLogits.save")
        out = cls(tensors["rows"], tensors["positions"], tensors["candidates"], tensors["logits"],
                  meta.get("dataset_fingerprint", ""), json.loads(meta.get("meta") or "{}"))
        if dataset is not None:
            out.check(dataset, str(path))
        return out

    def check(self, dataset: Dataset, source: str = "teacher logits") -> None:
        """The rows, positions and candidates fit ``dataset`` (the same split, by fingerprint)."""
        if self.dataset_fingerprint != dataset.fingerprint():
            raise DataError(f"{source}: made on dataset fingerprint {self.dataset_fingerprint}, this run's dataset "
                            f"'{dataset.name}' is {dataset.fingerprint()}; recompute the teacher logits on this data")
        n_seq = len(dataset.train)
        if len(self) and (self.rows.min() < 0 or self.rows.max() >= n_seq):
            raise DataError(f"{source}: a row index is outside 0..{n_seq - 1} (the training sequences)")
        lengths = np.array([len(s) for s in dataset.train], dtype=np.int64)
        if len(self) and ((self.positions < 1) | (self.positions >= lengths[self.rows])).any():
            raise DataError(f"{source}: a position is outside 1..len(sequence)-1 (a target needs a history)")
        if len(self) and (self.candidates.min() < 1 or self.candidates.max() > dataset.n_items):
            raise DataError(f"{source}: a candidate item is outside 1..{dataset.n_items} (padding or unknown item)")
        targets = np.array([dataset.train[r][p] for r, p in zip(self.rows, self.positions)], dtype=np.int64)
        if len(self) and not np.array_equal(self.candidates[:, 0], targets):
            raise DataError(f"{source}: column 0 of the candidates must be each row's target train[row][position]")


# ---------------------------------------------------------------------------------------------------- the hook
def causal_window_sources(sequences: list[np.ndarray], max_len: int) -> list[tuple[int, int]]:
    """``(sequence index, start)`` of every window :func:`~distillrec.data.batching.causal_windows` makes, in its
    order: window ``i`` is ``inputs = seq[start:start + len]`` predicting ``seq[start + 1:start + 1 + len]``."""
    out = []
    for j, s in enumerate(sequences):
        if len(s) < 2:
            continue
        end = len(s) - 1
        while end > 0:
            start = max(0, end - max_len)
            out.append((j, start))
            end = start
    return out


class TeacherHook:
    """The KD term of the trainer for one run: which teacher rows each training unit (causal window or prefix row)
    carries, and their loss on a batch of units."""

    def __init__(self, cfg: Any, dataset: Dataset, train_format: str, units: Any, max_len: int):
        self.cfg, self.dataset, self.max_len = cfg, dataset, max_len
        path = Path(cfg.path)
        if cfg.sha256 is not None and path.is_file() and file_sha256(path) != cfg.sha256:
            raise DataError(f"train.teacher.path: '{path}' is not the file of train.teacher.sha256 ({cfg.sha256[:12]}"
                            "...): it changed since the config was written; recompute the teacher logits or update "
                            "the sha256")
        self.teacher = TeacherLogits.load(path, dataset)
        rows, pos = self.teacher.rows, self.teacher.positions
        by_unit: dict[int, list[int]] = {}
        if train_format == "causal":
            sources = causal_window_sources(dataset.train, max_len)
            if len(sources) != len(units):
                raise RuntimeError("teacher hook: the causal windows do not match the trainer's")
            where: dict[tuple[int, int], int] = {}
            lengths = {}
            for u, (j, start) in enumerate(sources):
                n = len(units[u][0])
                lengths[u] = n
                for q in range(start, start + n):  # input index q predicts seq[q + 1]
                    where[(j, q)] = u
            for t, (j, p) in enumerate(zip(rows, pos)):
                by_unit.setdefault(where[(int(j), int(p) - 1)], []).append(t)
        elif train_format == "prefix":  # Examples.from_sequences: sequence j's prefixes k = 1..len-1, in order
            offsets = np.concatenate([[0], np.cumsum([max(0, len(s) - 1) for s in dataset.train])])
            for t, (j, p) in enumerate(zip(rows, pos)):
                by_unit.setdefault(int(offsets[j] + p - 1), []).append(t)
        else:
            raise ConfigError(f"train.teacher: models with train_format '{train_format}' cannot be distilled")
        self.by_unit = {u: np.array(v, dtype=np.int64) for u, v in by_unit.items()}
        self.logits = torch.from_numpy(self.teacher.logits)
        self.candidates = torch.from_numpy(self.teacher.candidates)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.cfg.path), "rows": len(self.teacher), "candidates": int(self.candidates.shape[1]),
                "weight": self.cfg.weight, "temperature": self.cfg.temperature, "weighting": self.cfg.weighting,
                "meta": self.teacher.meta}

    def rows_of(self, unit_idx: Any) -> np.ndarray:
        parts = [self.by_unit[int(u)] for u in unit_idx if int(u) in self.by_unit]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def loss(self, model: torch.nn.Module, unit_idx: Any) -> torch.Tensor | None:
        """``weight * sum_s w_s T^2 KL(teacher || model)`` over the teacher rows of these units (None: none)."""
        t_rows = self.rows_of(unit_idx)
        if not len(t_rows):
            return None
        train = self.dataset.train
        hist = [train[self.teacher.rows[t]][: self.teacher.positions[t]] for t in t_rows]
        history, lengths = pad_histories(hist, self.max_len)
        scores = model.score({"history": history, "lengths": lengths})  # [b, n_items + 1], with gradients
        idx = torch.from_numpy(t_rows)
        student = scores.gather(1, self.candidates[idx].to(scores.device))
        teacher = self.logits[idx].to(scores.device)
        w = kd_weights(teacher, self.cfg.weighting)
        return self.cfg.weight * kd_loss(student, teacher, self.cfg.temperature, w)
