"""Top-k recommendations for a session given in the user's own item ids, from a finished run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.batching import pad_histories
from ..data.dataset import Dataset
from ..errors import ConfigError, DataError
from ..models import Recommender
from ..runs import RunConfig, load_trained


@dataclass
class TrainedRecommender:
    model: Recommender
    dataset: Dataset
    config: RunConfig

    @classmethod
    def from_run(cls, run_dir: str | Path, seed: int | None = None) -> "TrainedRecommender":
        """The best-validation model of ``run_dir`` (for ``seed``, default the config's first seed)."""
        t = load_trained(run_dir, seed)
        return cls(t.model, t.dataset, t.config)

    @torch.no_grad()
    def recommend(self, session: list[str], k: int = 10, exclude_seen: bool = False) -> list[tuple[str, float]]:
        """``k`` (external item id, score) pairs for a session of external item ids, best first."""
        if k < 1:
            raise ConfigError(f"-k {k}: ask for at least one item")
        index = self.dataset.items.index()
        unknown = [i for i in session if i not in index]
        if unknown:
            raise DataError(f"unknown item id(s) {unknown[:5]}: they are not in the item table of '{self.dataset.name}'")
        if not session:
            raise DataError("the session is empty: give at least one item id")
        history, lengths = pad_histories([np.array([index[i] for i in session])], self.config.train.max_len)
        scores = self.model.score({"history": history, "lengths": lengths})[0].float()
        scores[0] = -torch.inf
        if exclude_seen:
            scores[history[0]] = -torch.inf
        top = torch.topk(scores, min(k, self.dataset.n_items))
        return [(self.dataset.items.ids[i - 1], float(s)) for s, i in zip(top.values, top.indices.tolist())
                if torch.isfinite(s)]
