"""Session-based kNN (SKNN; Jannach & Ludewig, RecSys 2017), as in session-rec's ``SessionKNN``.

For a history h (its set of items) and every training sequence s (its set of items):

1. candidates: the training sessions that share at least one item with h; with ``sample_size > 0`` only the
   ``sample_size`` most recent of them (= the last ones in ``dataset.train`` order) are kept, like session-rec's
   ``sampling="recent"``;
2. similarity: ``cosine`` = |h & s| / sqrt(|h| |s|), or ``jaccard`` = |h & s| / |h | s|;
3. neighbours: the ``k`` candidates with the highest similarity;
4. score(item) = sum of the similarities of the neighbours that contain the item.

With ``recency_weighting`` (the V-SKNN variant, session-rec's ``VMContextKNN`` weightings) each history item
counts in |h & s| with a weight that grows with its position (1-based position i of its last occurrence, history
length L): ``linear`` = max(0, 1 - 0.1 (L - i)), ``div`` = i / L, ``quadratic`` = (i / L)^2,
``log`` = 1 / log10(L - i + 1.7). The denominators keep the plain set sizes, so ``none`` is exactly SKNN.
(session-rec's V-SKNN uses its own "vec" similarity, weighted overlap / |h|; here the weighting modifies the
chosen similarity instead. session-rec's ``cosine`` also has an operator-precedence slip, li / sqrt(la) * sqrt(lb);
this file uses the textbook cosine.)

Everything is a batch of sparse matrix products: the training sessions are a binary sparse CSR matrix
``M`` [n_sessions, n_items + 1]; a batch of histories is a dense [B, n_items + 1] indicator (or weight) matrix H;
overlaps are ``M @ H^T`` and scores are ``M^T @ W^T`` with W the [B, n_sessions] matrix of kept neighbour
similarities. Memory per batch is O(B * n_sessions) floats (512 x 40k sessions = 80 MB).
Nothing is trained (``trainable`` is False): ``fit`` builds M, ``score`` ranks.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..data.dataset import Dataset
from .base import ModelConfig, Recommender, register_model


class SKNNConfig(ModelConfig):
    k: int = Field(100, ge=1)  # neighbours kept per history
    sample_size: int = Field(0, ge=0)  # most recent candidate sessions considered; 0 = all
    similarity: Literal["cosine", "jaccard"] = "cosine"
    recency_weighting: Literal["none", "linear", "div", "quadratic", "log"] = "none"


def recency_weights(history: torch.Tensor, lengths: torch.Tensor, kind: str) -> torch.Tensor:
    """Weight of each position of right-padded ``history`` [B, L]; padding positions get 0."""
    pos = torch.arange(1, history.shape[1] + 1, device=history.device, dtype=torch.float32).unsqueeze(0)
    length = lengths.to(torch.float32).clamp(min=1).unsqueeze(1)
    if kind == "none":
        w = torch.ones_like(pos).expand(history.shape[0], -1)
    elif kind == "linear":
        w = (1.0 - 0.1 * (length - pos)).clamp(min=0.0)
    elif kind == "div":
        w = pos / length
    elif kind == "quadratic":
        w = (pos / length) ** 2
    elif kind == "log":
        w = 1.0 / torch.log10((length - pos).clamp(min=0.0) + 1.7)
    else:
        raise ValueError(f"unknown recency_weighting '{kind}'")
    valid = pos <= lengths.unsqueeze(1)
    return torch.where(valid & (history > 0), w, torch.zeros_like(w))


@register_model("sknn")
class SKNN(Recommender):
    Config = SKNNConfig

    def __init__(self, config: SKNNConfig, dataset: Dataset):
        super().__init__(config, dataset)
        self.config: SKNNConfig = config
        # Non-persistent buffers: rebuilt by fit(), follow .to(device), stay out of checkpoints.
        self.register_buffer("sessions", None, persistent=False)  # M   [S, n_items + 1] binary CSR
        self.register_buffer("sessions_t", None, persistent=False)  # M^T [n_items + 1, S] binary CSR
        self.register_buffer("session_sizes", None, persistent=False)  # |s| [S]

    def fit(self, dataset: Dataset) -> None:
        rows, cols = [], []
        for j, seq in enumerate(dataset.train):
            items = np.unique(np.asarray(seq, dtype=np.int64))
            items = items[items > 0]
            rows.append(np.full(len(items), j, dtype=np.int64))
            cols.append(items)
        n_sessions, width = len(dataset.train), self.n_items + 1
        row = torch.from_numpy(np.concatenate(rows)) if rows else torch.zeros(0, dtype=torch.int64)
        col = torch.from_numpy(np.concatenate(cols)) if cols else torch.zeros(0, dtype=torch.int64)
        ones = torch.ones(len(row), dtype=torch.float32)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            coo = torch.sparse_coo_tensor(
                torch.stack([row, col]), ones, (n_sessions, width), check_invariants=True
            ).coalesce()
            self.sessions = coo.to_sparse_csr()
            self.sessions_t = coo.t().coalesce().to_sparse_csr()
        self.session_sizes = torch.bincount(row, minlength=n_sessions).to(torch.float32)

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.sessions is None:
            raise RuntimeError("sknn: call fit(dataset) before score()")
        cfg = self.config
        history, lengths = batch["history"], batch["lengths"]
        device = history.device
        if self.sessions.device != device:
            self.to(device)
        n_batch, width = history.shape[0], self.n_items + 1

        # History item sets: binary indicator and recency weights (an item's weight is that of its last occurrence).
        weights = recency_weights(history, lengths, cfg.recency_weighting)
        present = (history > 0) & (torch.arange(history.shape[1], device=device) < lengths[:, None])
        h_bin = torch.zeros(n_batch, width, device=device)
        h_bin.scatter_(1, history, present.to(torch.float32))
        h_bin[:, 0] = 0.0
        h_size = h_bin.sum(1, keepdim=True)  # |h| [B, 1]
        h_in = h_bin
        if cfg.recency_weighting != "none":
            h_w = torch.zeros(n_batch, width, device=device).scatter_reduce(1, history, weights, reduce="amax")
            h_w[:, 0] = 0.0
            h_in = torch.cat([h_bin, h_w], dim=0)

        # Overlaps with every training session: [S, B] (or [S, 2B] with weights) -> [B, S].
        overlap_all = torch.sparse.mm(self.sessions, h_in.t().contiguous()).t().contiguous()
        overlap = overlap_all[:n_batch]  # |h & s|
        sim = overlap_all[n_batch:] if cfg.recency_weighting != "none" else overlap.clone()  # weighted |h & s|

        s_size = self.session_sizes.unsqueeze(0)  # [1, S]
        if cfg.similarity == "cosine":
            sim.mul_(h_size.clamp(min=1).rsqrt()).mul_(s_size.clamp(min=1).rsqrt())
        else:  # jaccard
            sim.div_((h_size + s_size - overlap).clamp(min=1))

        # Candidates share an item (the others already have similarity 0); with sample_size only the most recent
        # sample_size candidates (last in train order) stay.
        if cfg.sample_size > 0:
            count = (overlap > 0).to(torch.float32)  # float cumsum: exact below 2^24 sessions, and fast
            from_end = count.sum(1, keepdim=True) - count.cumsum(1) + count  # candidates at this index or later
            sim.masked_fill_(from_end > cfg.sample_size, 0.0)

        # k nearest neighbours; non-candidates picked to fill up k have similarity 0 and add nothing.
        k = min(cfg.k, sim.shape[1])
        neighbours = torch.zeros_like(sim)
        if k > 0:
            top_sim, top_idx = sim.topk(k, dim=1)
            neighbours.scatter_(1, top_idx, top_sim)

        # score(item) = sum of neighbour similarities over the neighbours containing the item: (M^T @ W^T)^T.
        scores = torch.sparse.mm(self.sessions_t, neighbours.t().contiguous()).t()
        return scores.contiguous()
