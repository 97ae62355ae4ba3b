"""Most-popular: every session gets the items ranked by their training frequency."""

from __future__ import annotations

import torch

from ..data.dataset import Dataset
from .base import ModelConfig, Recommender, register_model


class PopConfig(ModelConfig):
    pass


@register_model("pop")
class Pop(Recommender):
    Config = PopConfig

    def __init__(self, config: PopConfig, dataset: Dataset):
        super().__init__(config, dataset)
        self.register_buffer("counts", torch.zeros(dataset.n_items + 1))

    def fit(self, dataset: Dataset) -> None:
        self.counts.copy_(torch.from_numpy(dataset.item_train_counts()).float())

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.counts.unsqueeze(0).expand(batch["history"].shape[0], -1).clone()
