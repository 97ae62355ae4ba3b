"""SR-GNN (Wu et al., AAAI 2019), following CRIPAC-DIG/SR-GNN ``pytorch_code/model.py`` and ``utils.py``.

Per history:

1. session graph: the unique items are the nodes (sorted by id, as ``np.unique``); each consecutive pair
   (s_t, s_t+1) adds the edge s_t -> s_t+1 (binary: a repeated transition counts once). With u_A the [N, N] 0/1
   edge matrix, ``A_in[v, u] = u_A[u, v] / indeg(v)`` and ``A_out[u, w] = u_A[u, w] / outdeg(u)`` (degrees of 0
   count as 1); ``A = [A_in | A_out]`` is [N, 2N], exactly the original's ``get_slice``;
2. gated GNN, ``step`` times: a_in = A_in (W_in h + b_in) + b_iah, a_out = A_out (W_out h + b_out) + b_oah,
   then a GRU-style update of h from [a_in, a_out];
3. readout over the sequence positions (repeats count once per occurrence): the last item's node state h_n,
   attention alpha_t = q^T sigmoid(W1 h_n + W2 h_t), global s_g = sum_t alpha_t h_t; hybrid (default)
   s = W3 [s_g; h_n], ``nonhybrid`` s = s_g;
4. scores = s . e_i against every item embedding; training is cross-entropy over items 1..n on
   history -> target rows (``train_format = "prefix"``).

All parameters are initialised uniform(-1/sqrt(hidden), 1/sqrt(hidden)) as in the original. The original's
training defaults, which the shared trainer owns: lr 0.001, Adam weight decay (l2) 1e-5, batch size 100,
lr decay 0.1 every 3 epochs, 30 epochs, early-stopping patience 10.

Differences from the original, none of which changes a score: the padding item 0 is not made a graph node
(the original adds it as an isolated, masked node), and the graphs of a batch are built with sorting/scatter ops
instead of a Python loop per row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.dataset import Dataset
from .base import ModelConfig, Recommender, register_model


class SRGNNConfig(ModelConfig):
    hidden_size: int = Field(100, ge=1)
    step: int = Field(1, ge=1)  # gated-GNN propagation steps
    nonhybrid: bool = False  # True: use only the attention (global) session vector, not [global; last item]


def session_graphs(history: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Session graphs of a right-padded batch ``history`` [B, L] (0 = padding).

    Returns ``items`` [B, N] (node -> item id, 0 for padding nodes), ``alias`` [B, L] (position -> node index;
    padding positions -> 0, masked later), ``A`` [B, N, 2N] (= [A_in | A_out]) and ``mask`` [B, L].
    """
    n_batch, max_len = history.shape
    device = history.device
    mask = torch.arange(max_len, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    big = torch.iinfo(history.dtype).max
    keyed = torch.where(mask & (history > 0), history, torch.full_like(history, big))  # padding sorts last
    sorted_items, order = keyed.sort(dim=1)
    valid = sorted_items != big
    is_new = valid.clone()
    is_new[:, 1:] &= sorted_items[:, 1:] != sorted_items[:, :-1]
    node_of_sorted = is_new.to(torch.int64).cumsum(1) - 1  # node index of each sorted position
    node_of_sorted = torch.where(valid, node_of_sorted, torch.zeros_like(node_of_sorted))
    n_nodes = max(1, int(is_new.sum(1).max())) if n_batch else 1

    alias = torch.zeros_like(history).scatter_(1, order, node_of_sorted)
    items = torch.zeros(n_batch, n_nodes, dtype=history.dtype, device=device)
    rows = torch.arange(n_batch, device=device).unsqueeze(1).expand_as(is_new)
    items[rows[is_new], node_of_sorted[is_new]] = sorted_items[is_new]

    # Edges s_t -> s_{t+1} for every t with both positions inside the history; binary like the original.
    u_a = torch.zeros(n_batch, n_nodes, n_nodes, device=device)
    edge = mask[:, 1:] & (history[:, 1:] > 0) & (history[:, :-1] > 0)
    erow = rows[:, 1:][edge]
    u_a[erow, alias[:, :-1][edge], alias[:, 1:][edge]] = 1.0
    in_deg = u_a.sum(1).clamp(min=1.0)  # column sums: in-degree of each node
    out_deg = u_a.sum(2).clamp(min=1.0)  # row sums: out-degree
    a_in = u_a.transpose(1, 2) / in_deg.unsqueeze(2)
    a_out = u_a / out_deg.unsqueeze(2)
    return {"items": items, "alias": alias, "A": torch.cat([a_in, a_out], dim=2), "mask": mask}


class GatedGNN(nn.Module):
    """The original ``GNN`` module (its unused ``linear_edge_f`` left out)."""

    def __init__(self, hidden: int, step: int):
        super().__init__()
        self.step = step
        self.w_ih = nn.Parameter(torch.empty(3 * hidden, 2 * hidden))
        self.w_hh = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.b_ih = nn.Parameter(torch.empty(3 * hidden))
        self.b_hh = nn.Parameter(torch.empty(3 * hidden))
        self.b_iah = nn.Parameter(torch.empty(hidden))
        self.b_oah = nn.Parameter(torch.empty(hidden))
        self.linear_edge_in = nn.Linear(hidden, hidden)
        self.linear_edge_out = nn.Linear(hidden, hidden)

    def cell(self, adj: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        n = adj.shape[1]
        input_in = torch.matmul(adj[:, :, :n], self.linear_edge_in(hidden)) + self.b_iah
        input_out = torch.matmul(adj[:, :, n : 2 * n], self.linear_edge_out(hidden)) + self.b_oah
        gi = F.linear(torch.cat([input_in, input_out], 2), self.w_ih, self.b_ih)
        gh = F.linear(hidden, self.w_hh, self.b_hh)
        i_r, i_i, i_n = gi.chunk(3, 2)
        h_r, h_i, h_n = gh.chunk(3, 2)
        reset = torch.sigmoid(i_r + h_r)
        update = torch.sigmoid(i_i + h_i)
        new = torch.tanh(i_n + reset * h_n)
        return new + update * (hidden - new)

    def forward(self, adj: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        for _ in range(self.step):
            hidden = self.cell(adj, hidden)
        return hidden


@register_model("srgnn")
class SRGNN(Recommender):
    Config = SRGNNConfig
    train_format = "prefix"

    def __init__(self, config: SRGNNConfig, dataset: Dataset):
        super().__init__(config, dataset)
        self.config: SRGNNConfig = config
        hidden = config.hidden_size
        self.embedding = nn.Embedding(self.n_items + 1, hidden)
        self.gnn = GatedGNN(hidden, config.step)
        self.linear_one = nn.Linear(hidden, hidden)
        self.linear_two = nn.Linear(hidden, hidden)
        self.linear_three = nn.Linear(hidden, 1, bias=False)
        self.linear_transform = nn.Linear(2 * hidden, hidden)
        stdv = 1.0 / math.sqrt(hidden)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def session_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The session representation s [B, hidden]."""
        g = session_graphs(batch["history"], batch["lengths"])
        hidden = self.gnn(g["A"], self.embedding(g["items"]))  # [B, N, d] node states
        seq_hidden = hidden.gather(1, g["alias"].unsqueeze(2).expand(-1, -1, hidden.shape[2]))  # [B, L, d]
        mask = g["mask"]
        last = (batch["lengths"].clamp(min=1) - 1).to(torch.int64)
        ht = seq_hidden[torch.arange(seq_hidden.shape[0], device=seq_hidden.device), last]  # [B, d]
        q1 = self.linear_one(ht).unsqueeze(1)
        q2 = self.linear_two(seq_hidden)
        alpha = self.linear_three(torch.sigmoid(q1 + q2))  # [B, L, 1]
        a = torch.sum(alpha * seq_hidden * mask.unsqueeze(2).to(seq_hidden.dtype), 1)
        if not self.config.nonhybrid:
            a = self.linear_transform(torch.cat([a, ht], 1))
        return a

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores of items 1..n, [B, n_items]."""
        return self.session_vectors(batch) @ self.embedding.weight[1:].t()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self._logits(batch), batch["target"] - 1)

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._logits(batch)
        pad = torch.full((logits.shape[0], 1), -torch.inf, dtype=logits.dtype, device=logits.device)
        return torch.cat([pad, logits], dim=1)
