"""What every next-item model with an item table shares: the causal loss (CE or BPR) and last-position scoring.

A subclass supplies ``encode(history, table) -> [B, L, d]`` (the sequence representation at every position) and
keeps its item embeddings in ``self.item_emb``; ``item_table()`` is the one place items become vectors, so the
fused (ID + frozen features) variants in :mod:`.fused` change only that method and nothing else.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .base import ModelConfig, Recommender


class SequentialConfig(ModelConfig):
    loss_type: Literal["CE", "BPR"] = "CE"  # CE: softmax over all items; BPR: one sampled negative per position


class SequentialRecommender(Recommender):
    train_format = "causal"

    def item_table(self) -> torch.Tensor:
        """``[n_items + 1, d]``, used both to embed the input items and to score the output (tied weights)."""
        return self.item_emb.weight

    def encode(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        table = self.item_table()
        h = self.encode(batch["history"], table)
        # keep only positions that have a target *before* the output matmul: padding costs nothing there
        valid = batch["target_seq"] > 0
        h, target = h[valid], batch["target_seq"][valid]  # [n_valid, d], [n_valid]
        if self.config.loss_type == "CE":
            # leave out row 0 (padding) so it is never a class: logits over items 1..n, labels shifted by one
            logits = h @ table[1:].T
            return F.cross_entropy(logits, target - 1)
        # BPR: a negative drawn uniformly from items 1..n other than the target (global RNG: seeding reproduces it).
        # Draw from n - 1 values and step over the target, which is exactly uniform on the rest.
        neg = torch.randint(1, self.n_items, target.shape, device=target.device)
        neg = neg + (neg >= target).long()
        pos_score = (h * table[target]).sum(-1)
        neg_score = (h * table[neg]).sum(-1)
        return -F.logsigmoid(pos_score - neg_score).mean()  # = RecBole's -log(sigmoid(pos - neg)), but stable

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        table = self.item_table()
        h = self.encode(batch["history"], table)
        # right padding: the representation of the whole history sits at position length - 1
        last = (batch["lengths"] - 1).clamp(min=0).to(h.device)
        h = h[torch.arange(h.shape[0], device=h.device), last]
        scores = h @ table.T
        scores[:, 0] = -torch.inf  # padding is never recommended
        return scores
