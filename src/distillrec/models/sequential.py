"""What every next-item model with an item table shares: the causal loss (CE or BPR) and last-position scoring.

A subclass supplies ``encode(history, table) -> [B, L, d]`` (the sequence representation at every position) and
keeps its item embeddings in ``self.item_emb``; ``item_table()`` is the one place items become vectors, so the
fused (ID + frozen features) variants in :mod:`.fused` change only that method and nothing else.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import ModelConfig, Recommender


class SequentialConfig(ModelConfig):
    loss_type: Literal["CE", "BPR"] = "CE"  # CE: softmax over all items; BPR: one sampled negative per position
    # CE over all items in chunks of this many positions, logits recomputed in the backward pass: memory
    # ~ chunk x n_items instead of (positions in the batch) x n_items x 3, for one more output GEMM per chunk.
    # Loss and gradients equal the one-chunk ones up to float rounding (so results move at that level). None: one
    # chunk, bit for bit the plain F.cross_entropy (the default, so no existing result changes).
    ce_chunk: int | None = Field(default=None, ge=1)


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i @ W.T, y_i) without ever holding more than ``chunk`` rows of logits (in both passes)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        lse = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
        total = h.new_zeros(())
        for s in range(0, h.shape[0], chunk):
            logits = h[s : s + chunk] @ weight.T
            lse[s : s + chunk] = torch.logsumexp(logits, dim=1)
            total += (lse[s : s + chunk] - logits.gather(1, target[s : s + chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, weight, target, lse)
        ctx.chunk = chunk
        return total / h.shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, target, lse = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        scale = grad / h.shape[0]
        for s in range(0, h.shape[0], ctx.chunk):
            p = (h[s : s + ctx.chunk] @ weight.T).sub_(lse[s : s + ctx.chunk, None]).exp_()  # softmax, in place
            p.scatter_add_(1, target[s : s + ctx.chunk, None], torch.full_like(p[:, :1], -1.0))
            p.mul_(scale)
            grad_h[s : s + ctx.chunk] = p @ weight
            grad_w.addmm_(p.T, h[s : s + ctx.chunk])
        return grad_h, grad_w, None, None


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
            if self.config.ce_chunk is not None and h.shape[0] > self.config.ce_chunk:
                return ChunkedCrossEntropy.apply(h, table[1:], target - 1, self.config.ce_chunk)
            logits = h @ table[1:].T
            return F.cross_entropy(logits, target - 1)
        # BPR: a negative drawn uniformly from items 1..n other than the target (global RNG: seeding reproduces it).
        # Draw from n - 1 values and step over the target, which is exactly uniform on the rest.
        neg = torch.randint(1, self.n_items, target.shape, device=target.device)
        neg = neg + (neg >= target).long()
        pos_score = (h * table[target]).sum(-1)
        neg_score = (h * table[neg]).sum(-1)
        return -F.logsigmoid(pos_score - neg_score).mean()  # = RecBole's -log(sigmoid(pos - neg)), but stable

    def encode_at(self, history: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``encode`` at ``positions`` [B, k] only, [B, k, d] (a model may compute less, e.g. SASRec's last block)."""
        h = self.encode(history, table)
        return h.gather(1, positions[..., None].expand(*positions.shape, h.shape[-1]).to(h.device))

    def eval_window(self, history: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of an evaluation history the encoder reads (default: all of it; SASRec keeps its last max_len)."""
        return history, lengths

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.score_into(batch, None)

    def score_into(self, batch: dict[str, torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        # ``out``: a reusable [>= B, n_items + 1] buffer (the evaluator's), so the score product writes into memory
        # that is already mapped instead of faulting in a fresh [B, n] matrix per batch;
        # the values are those of ``score``, which is this with ``out=None``
        table = self.item_table()
        history, lengths = self.eval_window(batch["history"], batch["lengths"])
        # right padding: the representation of the whole history sits at position length - 1
        last = (lengths - 1).clamp(min=0).to(history.device)
        h = self.encode_at(history, table, last[:, None])[:, 0]
        scores = torch.mm(h, table.T) if out is None else torch.mm(h, table.T, out=out[: h.shape[0]])
        scores[:, 0] = -torch.inf  # padding is never recommended
        return scores

    def score_last_two_into(
        self, batch: dict[str, torch.Tensor], out_before: torch.Tensor, out_last: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores after the history without its last item and after the whole history, from one encoder pass: the
        encoder is causal, so position length - 2 of a history is the representation of that history minus its last
        item. The evaluator uses this to rank validation (history h -> target v) and test (h + [v] -> t) rows of a
        leave-one-out split together. Rows need length >= 2 and must not be cut by ``eval_window``."""
        table = self.item_table()
        last = (batch["lengths"] - 1).to(batch["history"].device)
        h = self.encode_at(batch["history"], table, torch.stack([last - 1, last], dim=1))
        before = torch.mm(h[:, 0], table.T, out=out_before[: h.shape[0]])
        after = torch.mm(h[:, 1], table.T, out=out_last[: h.shape[0]])
        before[:, 0] = -torch.inf
        after[:, 0] = -torch.inf
        return before, after
