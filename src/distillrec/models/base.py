"""The one interface every recommender implements, and the registry that finds them by name.

A recommender is an ``nn.Module`` built from ``(config, dataset)``. The shared trainer calls ``fit(dataset)`` once
(non-parametric statistics), then ``loss(batch)`` per training batch while ``trainable``; the evaluator calls
``score(batch) -> [B, n_items + 1]`` (column 0 = padding, never ranked).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..data.dataset import Dataset
from .features import require_features, standardize_columns  # noqa: F401  (their home is .features)


class ModelConfig(BaseModel):
    """Base of every model's hyperparameters; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


class Recommender(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    train_format: ClassVar[str] = "causal"  # "causal" (every position) or "prefix" (history -> target rows)

    def __init__(self, config: ModelConfig, dataset: Dataset):
        super().__init__()
        self.config = config
        self.n_items = dataset.n_items

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @property
    def content_item_vectors(self) -> bool:
        """Whether an item never seen in training still gets a vector from its content (frozen item features), so
        that it can be recommended and read in a session (cold start). Serving asks this: a model that says no has
        nothing learnt about such an item, and serving neither recommends it nor reads it."""
        return False

    def fit(self, dataset: Dataset) -> None:
        """Collect statistics from the training sequences (Pop, SKNN, co-occurrence graphs). Default: nothing."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no trainable loss")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # forward() is the training loss so that DistributedDataParallel's gradient hooks see it
        return self.loss(batch)

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def score_into(self, batch: dict[str, torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        """``score(batch)``, written into ``out[:B]`` where the model can (a buffer the evaluator reuses across
        batches); the default ignores ``out``. The returned tensor is only valid until the next call."""
        return self.score(batch)


_REGISTRY: dict[str, type[Recommender]] = {}


def register_model(name: str):
    """Class decorator: ``@register_model("sasrec")``. User code can register its own models the same way, or
    through the ``distillrec.models`` entry-point group."""

    def wrap(cls: type[Recommender]) -> type[Recommender]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"a model named '{name}' is already registered ({_REGISTRY[key].__module__})")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return wrap


def _load_entry_points() -> None:
    for ep in entry_points(group="distillrec.models"):
        if ep.name.lower() not in _REGISTRY:
            ep.load()


def get_model_class(name: str) -> type[Recommender]:
    key = name.lower()
    if key not in _REGISTRY:
        _load_entry_points()
    if key not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def available_models() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def build_model(name: str, params: dict, dataset: Dataset) -> Recommender:
    cls = get_model_class(name)
    return cls(cls.Config(**params), dataset)
