"""Frozen item features, the tunable adapters over them, and the evaluation-time cache of a model's item tables:
the parts DIMO (its modality view) and the fused GRU4Rec/SASRec (ID + features item table) share.

- :func:`frozen_features`: the named ``dataset.items.features`` matrices ``[n_items + 1, d_f]`` (row 0 = padding),
  each standardised column-wise (``feature_norm: standardize``) or taken as they are (``none``). A model registers
  them as **non-persistent** buffers: they move with ``.to(device)``, are never trained, never re-initialised, never
  written to, and stay out of checkpoints (they are a function of the dataset, which building the model needs anyway).
- :func:`make_adapter`: ``Linear`` (or ``Linear-GELU-Linear``), then an optional ``LayerNorm`` whose gain starts at
  the ID table's init scale, then an optional ``Dropout``, as one ``nn.Sequential`` (so checkpoint keys are
  ``<name>.0.weight``, ``<name>.1.weight``, ...).
- :func:`padding_row_mask`: ``[n_items + 1, 1]`` ones with row 0 zero; multiplying a table by it keeps the padding
  row at zero despite adapter biases and LayerNorm.
- :class:`CachedItemTables`: scoring calls ``score()`` batch after batch with unchanged weights, so in evaluation
  (``eval()`` and no autograd) a model's item tables are built once and reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from ..data.dataset import Dataset

FeatureNorm = Literal["standardize", "none"]
T = TypeVar("T")


def standardize_columns(matrix: np.ndarray) -> np.ndarray:
    """Frozen item features ``[n_items + 1, d]`` with every column at mean 0, std 1 over items 1..n (row 0, the
    padding row, stays 0; constant columns become 0). LM hidden states (TPAD embeddings) carry a few huge, nearly
    constant coordinates that would otherwise swamp an adapter's input: on the demo, TPAD image rows of different
    items have cosine 0.99998 before this and differ only after it."""
    m = np.asarray(matrix, dtype=np.float32)
    body = m[1:].astype(np.float64)
    std = body.std(0)
    out = np.zeros_like(m)
    out[1:] = ((body - body.mean(0)) / np.where(std > 1e-8, std, np.inf)).astype(np.float32)
    return out


def require_features(model: str, dataset: Dataset, names: list[str], hint: str) -> list[np.ndarray]:
    """The named item feature matrices of ``dataset``; a missing one is an error naming what exists and ``hint``."""
    available = dataset.items.features
    for name in names:
        if name not in available:
            raise ValueError(f"{model}: the dataset has no item feature '{name}'; available features: "
                             f"{', '.join(sorted(available)) or 'none'} ({hint})")
    return [available[name] for name in names]


def frozen_features(model: str, dataset: Dataset, names: list[str], norm: FeatureNorm, hint: str) -> list[np.ndarray]:
    """The named feature matrices as float32, standardised (``norm="standardize"``, a new array) or as they are
    (``"none"``: the dataset's own array when it is already float32: never write to it)."""
    raw = require_features(model, dataset, names, hint)
    return [standardize_columns(m) if norm == "standardize" else np.asarray(m, dtype=np.float32) for m in raw]


def make_adapter(d_in: int, d_out: int, *, mlp: bool = False, layernorm: bool = True, gain: float = 1.0,
                 dropout: float | None = None) -> nn.Sequential:
    """``Linear(d_in, d_out)`` (``mlp``: then ``GELU``, ``Linear(d_out, d_out)``), then ``LayerNorm(d_out)`` with its
    gain initialised to ``gain`` (``layernorm``), then ``Dropout(dropout)`` (unless ``dropout`` is None).

    The gain starts at the ID embeddings' init scale instead of 1: unit-variance rows would make the initial logits
    ~100x larger than the ID model's (init loss ~19 instead of ~log n on a toy set) and saturate the softmax; this
    way a feature view starts at the ID view's scale, and the gain is learnt."""
    layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
    if mlp:
        layers += [nn.GELU(), nn.Linear(d_out, d_out)]
    if layernorm:
        ln = nn.LayerNorm(d_out)
        nn.init.constant_(ln.weight, gain)
        layers.append(ln)
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def padding_row_mask(n_items: int) -> torch.Tensor:
    """``[n_items + 1, 1]``: 1 for items 1..n, 0 for the padding row 0."""
    mask = torch.ones(n_items + 1, 1)
    mask[0] = 0
    return mask


class CachedItemTables:
    """Mixin for a ``Recommender`` (placed before it in the bases): :meth:`cached_item_tables` builds the item tables
    anew in training mode or under autograd, and once per evaluation pass otherwise.

    The cache is dropped by ``train()``/``eval()`` (the evaluator calls ``eval()`` before every pass, so resumed
    training and writes through ``.data``, which bump no version, are never served stale tables) and by
    :meth:`drop_item_table_cache` (a model whose buffers change, e.g. a refit graph, calls it). Its key also follows
    in-place updates of parameters (their versions) and device moves (their storage)."""

    _item_table_cache: tuple[tuple, Any] | None = None

    def cached_item_tables(self, build: Callable[[], T], *extra_key: Any) -> T:
        if self.training or torch.is_grad_enabled():
            return build()
        key = tuple((p.data_ptr(), p._version) for p in self.parameters()) + extra_key
        if self._item_table_cache is None or self._item_table_cache[0] != key:
            self._item_table_cache = (key, build())
        return self._item_table_cache[1]

    def drop_item_table_cache(self) -> None:
        self._item_table_cache = None

    def train(self, mode: bool = True):
        self.drop_item_table_cache()
        return super().train(mode)
