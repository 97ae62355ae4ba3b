"""DIMO (Zhang et al., SIGIR 2024): "Disentangling ID and Modality Effects for Session-based Recommendation".

Follows the released code (``Zhang-xiaokun/DIMO`` ``model.py``, preprocessing in ``datasets/disenPre3.ipynb``),
with its bugs fixed; every difference is listed in ``docs/dimo.md``.

Two item views, each a table ``[n_items + 1, d]`` (row 0 = padding, always zero):

- **ID view**: ``nn.Embedding(n_items + 1, d, padding_idx=0)``;
- **modality view**: a tunable adapter (Linear or MLP, optional LayerNorm; :mod:`.features`, shared with the fused
  models) over the concatenation of the named frozen item features (``dataset.items.features``, e.g. TPAD or CLIP
  embeddings). The features are a non-persistent buffer: never trained, never re-initialised, never written to.
  With ``features: []`` the modality view is a second learned table (DIMO without side information).

``fit(dataset)`` builds, from ``dataset.train`` only (never valid/test):

- the item-item co-occurrence counts ``c_ij``: each ordered pair of positions (t, t') of one training sequence with
  ``1 <= |t - t'| <= cooccur_window`` and different items adds 1 to ``c[s_t, s_t']`` (``cooccur_window: null``:
  every pair of the sequence, the released code's rule for its <= 20-item sessions); the graph
  ``A = D^-1 C`` (row-normalised, torch sparse);
- per item its ``top_k_cooccur`` most co-occurring items (positives of L_co and of the criterion flag; weights
  ``c_ij / sum_top-k c``; empty slots are item 0 with weight 0) and ``top_k_cooccur`` negatives drawn at random from
  the items it never co-occurs with (the released "least co-occurring" items are zero-count items in arbitrary tie
  order; this makes the choice explicit).

Forward pass (training and scoring):

1. table dropout ``p = dropout`` on both tables (training only), then ``E <- E + A E`` ``co_layers`` times, per view;
2. per view, one multi-head scaled dot-product self-attention over the session's item vectors (Q/K/V linear maps, no
   output map, no FFN, no positions, key padding mask, attention dropout); the session vector ``s`` is the output at
   the last valid position, the proxy ``p`` the mean of the session's item vectors;
3. ``score = s_id E_id^T + s_mo E_mo^T`` over items 1..n; column 0 is -inf.

Loss: ``CE(score, target) + w_co L_co + w_pro L_pro + w_cri L_cri`` with (``log`` in base ``log_base``, cos = cosine
similarity, each term computed as a log-softmax, which is the same number, stably; ``aux_reduction: sum`` turns each
"mean" below into a sum, the released code's magnitude):

- ``L_co``  = mean over items i of ``log(e^cos(e_i, q_i) + sum_n e^cos(e_i, e_n)) - log e^cos(e_i, q_i)`` with
  ``q_i = sum_k w_ik e_k`` over the propagated ID table (computed on ``co_items_per_batch`` random items per batch);
- ``L_pro`` = -mean(a + b),
  ``a = log e^cos(W1 s_id, W2 p_id) - log(e^cos(W1 s_id, W2 p_id) + e^cos(W3 s_id, W4 s_mo))``,
  ``b = log e^cos(W5 s_mo, W6 p_mo) - log(e^cos(W5 s_mo, W6 p_mo) + e^cos(W7 s_mo, W8 s_id))`` (8 distinct maps);
- ``L_cri`` = -mean(c), ``c = flag * [log e^cos(s_id, E_id[y]) - log(e^cos(s_id, E_id[y]) + e^cos(s_mo, E_mo[y]))]``,
  ``flag = +1`` if the target is among the top-k co-occurring items of any item of the session, else -1.

The graph statistics are non-persistent buffers: they are a function of the training data, rebuilt by ``fit``. The
trainer, ``evaluate_run`` and ``serving.TrainedRecommender`` all call ``fit(dataset)`` right after building the
model and before loading a checkpoint, so a reloaded model scores exactly like the trained one; ``score``/``loss``
before ``fit`` raise an error instead of silently scoring without the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.dataset import Dataset
from .base import ModelConfig, Recommender, register_model
from .features import CachedItemTables, FeatureNorm, frozen_features, make_adapter, padding_row_mask


class DIMOConfig(ModelConfig):
    embedding_dim: int = Field(100, ge=1)
    num_heads: int = Field(4, ge=1)
    co_layers: int = Field(4, ge=0)  # propagation steps E <- E + A E
    dropout: float = Field(0.3, ge=0.0, lt=1.0)  # dropout on both item tables before propagation (training only)
    attn_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    aux_weight: float = Field(1e-3, ge=0.0)  # each auxiliary loss's weight unless set below (released: 1e-3 for all)
    co_weight: float | None = Field(None, ge=0.0)
    proxy_weight: float | None = Field(None, ge=0.0)
    counterfactual_weight: float | None = Field(None, ge=0.0)
    # "mean" (the default, kept on validation: docs/dimo.md): each auxiliary loss is a mean (over anchor items for
    # L_co, over the batch rows for L_pro and L_cri); "sum": the released magnitude (with the released weights, which
    # are the defaults): L_pro and L_cri summed over the batch rows, L_co = its sampled mean x the anchor item count
    aux_reduction: Literal["mean", "sum"] = "mean"
    top_k_cooccur: int = Field(10, ge=1)  # positives (and as many negatives) per item
    cooccur_window: int | None = Field(3, ge=1)  # pairs at most this many positions apart; None = whole sequence
    co_items_per_batch: int = Field(512, ge=1)  # items drawn per batch for L_co
    features: list[str] = Field(default_factory=list)  # frozen item features forming the modality view
    # "standardize": every feature column to mean 0 / std 1 over the items (models.features.standardize_columns)
    feature_norm: FeatureNorm = "standardize"
    adapter: Literal["linear", "mlp"] = "linear"
    adapter_layernorm: bool = True
    log_base: float = Field(10.0, gt=1.0)  # the released code uses log10 in all contrastive terms


# ---------------------------------------------------------------------------------------------------------------
# the auxiliary losses as plain functions (unit-tested on hand-made vectors)


def _log_softmax_first(pos: torch.Tensor, others: torch.Tensor, log_base: float) -> torch.Tensor:
    """``log_b e^pos - log_b(e^pos + sum e^others)`` per row; ``pos`` [N], ``others`` [N, M]."""
    logits = torch.cat([pos.unsqueeze(-1), others], dim=-1)
    return (pos - torch.logsumexp(logits, dim=-1)) / math.log(log_base)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    return x.sum() if reduction == "sum" else x.mean()


def cooccurrence_loss(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, log_base: float = 10.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_co. ``anchors`` [N, d] item vectors, ``positives`` [N, d] weighted top-k means, ``negatives`` [N, M, d]."""
    pos = F.cosine_similarity(anchors, positives, dim=-1)
    neg = F.cosine_similarity(anchors.unsqueeze(1), negatives, dim=-1)
    return -_reduce(_log_softmax_first(pos, neg, log_base), reduction)


def proxy_loss(
    s_id: torch.Tensor, p_id: torch.Tensor, s_mo: torch.Tensor, p_mo: torch.Tensor,
    maps: Sequence[Callable[[torch.Tensor], torch.Tensor]], log_base: float = 10.0, reduction: str = "mean",
) -> torch.Tensor:
    """L_pro, signature ``(s_id, p_id, s_mo, p_mo)``: each view's session vector is pulled to its own proxy (the mean
    of its items) and pushed from the other view's session vector. ``maps`` = (W1, ..., W8)."""
    w1, w2, w3, w4, w5, w6, w7, w8 = maps
    a_pos = F.cosine_similarity(w1(s_id), w2(p_id), dim=-1)
    a_neg = F.cosine_similarity(w3(s_id), w4(s_mo), dim=-1)
    b_pos = F.cosine_similarity(w5(s_mo), w6(p_mo), dim=-1)
    b_neg = F.cosine_similarity(w7(s_mo), w8(s_id), dim=-1)
    a = _log_softmax_first(a_pos, a_neg.unsqueeze(-1), log_base)
    b = _log_softmax_first(b_pos, b_neg.unsqueeze(-1), log_base)
    return -_reduce(a + b, reduction)


def counterfactual_loss(
    s_id: torch.Tensor, s_mo: torch.Tensor, target_id: torch.Tensor, target_mo: torch.Tensor, flag: torch.Tensor,
    log_base: float = 10.0, reduction: str = "mean",
) -> torch.Tensor:
    """L_cri: with flag +1 (the target co-occurs with the session in training) the ID view should explain the target
    better than the modality view; with flag -1 the other way round."""
    id_sim = F.cosine_similarity(s_id, target_id, dim=-1)
    mo_sim = F.cosine_similarity(s_mo, target_mo, dim=-1)
    c = _log_softmax_first(id_sim, mo_sim.unsqueeze(-1), log_base) * flag.to(id_sim.dtype)
    return -_reduce(c, reduction)


# ---------------------------------------------------------------------------------------------------------------
# co-occurrence statistics of the training sequences


def cooccurrence_counts(sequences: list[np.ndarray], n_items: int, window: int | None) -> tuple[np.ndarray, ...]:
    """Symmetric co-occurrence counts as COO ``(rows, cols, counts)`` over items 1..n (no self pairs)."""
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= 2]
    if not seqs:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    flat = np.concatenate(seqs)
    owner = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    longest = max(len(s) for s in seqs)
    max_gap = longest - 1 if window is None else min(window, longest - 1)
    rows, cols = [], []
    for gap in range(1, max_gap + 1):
        same = owner[gap:] == owner[:-gap]
        a, b = flat[:-gap][same], flat[gap:][same]
        keep = a != b
        rows += [a[keep], b[keep]]  # both directions: c is symmetric
        cols += [b[keep], a[keep]]
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    codes, counts = np.unique(rows_a * (n_items + 1) + cols_a, return_counts=True)
    return codes // (n_items + 1), codes % (n_items + 1), counts.astype(np.int64)


def top_cooccurring(rows, cols, counts, n_items: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item its ``k`` most co-occurring items (ties: smaller id first) and their count-normalised weights;
    ``[n_items + 1, k]``, empty slots item 0 with weight 0."""
    items = np.zeros((n_items + 1, k), dtype=np.int64)
    weights = np.zeros((n_items + 1, k), dtype=np.float32)
    if len(rows):
        order = np.lexsort((cols, -counts, rows))
        r, c, n = rows[order], cols[order], counts[order]
        starts = np.searchsorted(r, r, side="left")
        rank = np.arange(len(r)) - starts
        keep = rank < k
        items[r[keep], rank[keep]] = c[keep]
        weights[r[keep], rank[keep]] = n[keep]
    total = weights.sum(1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return items, weights


def sample_negatives(rows, cols, n_items: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per item ``k`` random items it never co-occurs with in training (not itself); ``[n_items + 1, k]``, row 0 = 0.
    Items that co-occur with nearly everything (tiny catalogues) are completed with random other items."""
    out = np.zeros((n_items + 1, k), dtype=np.int64)
    if n_items < 2:
        return out
    edges = np.sort(rows * (n_items + 1) + cols)
    item = np.arange(1, n_items + 1)
    need = np.ones(n_items, dtype=bool)
    filled = np.zeros(n_items, dtype=np.int64)
    for _ in range(8):
        idx = np.flatnonzero(need)
        if not len(idx):
            break
        cand = rng.integers(1, n_items + 1, size=(len(idx), 4 * k))
        code = item[idx, None] * (n_items + 1) + cand
        pos = np.searchsorted(edges, code).clip(max=max(len(edges) - 1, 0))
        linked = edges[pos] == code if len(edges) else np.zeros_like(cand, dtype=bool)
        ok = ~linked & (cand != item[idx, None])
        for j, row in enumerate(idx):
            got = cand[j][ok[j]][: k - filled[row]]
            out[row + 1, filled[row] : filled[row] + len(got)] = got
            filled[row] += len(got)
        need = filled < k
    for row in np.flatnonzero(need):  # fallback: any other item
        others = np.setdiff1d(item, [row + 1])
        out[row + 1, filled[row]:] = rng.choice(others, size=k - filled[row], replace=len(others) < k - filled[row])
    return out


# ---------------------------------------------------------------------------------------------------------------
# the model


class SessionAttention(nn.Module):
    """One multi-head scaled dot-product self-attention layer; returns the output at the last valid position.

    Only the last position's query is computed: with one layer and no FFN, the other positions' outputs are never
    used, so this is exactly the released code's last-position output at a fraction of the cost.
    """

    def __init__(self, dim: int, heads: int, attn_dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dimo: embedding_dim ({dim}) must be a multiple of num_heads ({heads})")
        self.heads, self.attn_dropout = heads, attn_dropout
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, seq: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        n_batch, length, dim = seq.shape
        head = dim // self.heads
        rows = torch.arange(n_batch, device=seq.device)
        q = self.query(seq[rows, last]).view(n_batch, self.heads, 1, head)
        k = self.key(seq).view(n_batch, length, self.heads, head).transpose(1, 2)
        v = self.value(seq).view(n_batch, length, self.heads, head).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(head)  # [B, h, 1, L]
        att = att.masked_fill(~mask[:, None, None, :], -1e9)
        att = F.dropout(att.softmax(-1), self.attn_dropout, self.training)
        return (att @ v).reshape(n_batch, dim)


@register_model("dimo")
class DIMO(CachedItemTables, Recommender):
    Config = DIMOConfig
    train_format = "prefix"

    def __init__(self, config: DIMOConfig, dataset: Dataset):
        super().__init__(config, dataset)
        self.config: DIMOConfig = config
        c, d, n = config, config.embedding_dim, self.n_items
        stdv = 1.0 / math.sqrt(d)  # the released init: U(-1/sqrt(d), 1/sqrt(d)) for every *learned* weight

        self.id_emb = nn.Embedding(n + 1, d, padding_idx=0)
        self.id_attention = SessionAttention(d, c.num_heads, c.attn_dropout)
        self.mo_attention = SessionAttention(d, c.num_heads, c.attn_dropout)
        self.proxy_maps = nn.ModuleList(nn.Linear(d, d) for _ in range(8))  # W1..W8, all distinct
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)
        with torch.no_grad():
            self.id_emb.weight[0].zero_()

        raw = frozen_features("dimo", dataset, c.features, c.feature_norm,
                              "or use features: [] for DIMO without side information")
        if c.features:
            # a copy (np.concatenate), registered as a non-persistent buffer: frozen, not checkpointed, never re-inited
            matrix = np.concatenate(raw, axis=1)
            self.register_buffer("item_features", torch.from_numpy(matrix), persistent=False)
            self.mo_emb = None
            # LayerNorm gain = the ID table's init std (U(-a, a) has std a/sqrt(3)): both views start at one scale
            self.adapter = make_adapter(matrix.shape[1], d, mlp=c.adapter == "mlp", layernorm=c.adapter_layernorm,
                                        gain=stdv / math.sqrt(3.0))
        else:
            self.item_features = None
            self.adapter = None
            self.mo_emb = nn.Embedding(n + 1, d, padding_idx=0)
            nn.init.uniform_(self.mo_emb.weight, -stdv, stdv)
            with torch.no_grad():
                self.mo_emb.weight[0].zero_()
        self.register_buffer("row_mask", padding_row_mask(n), persistent=False)
        self._fitted = False

    @property
    def content_item_vectors(self) -> bool:
        return self.adapter is not None  # the modality view over frozen features (not with features: [])

    # ----------------------------------------------------------------------------------------------- statistics

    def fit(self, dataset: Dataset) -> None:
        """Co-occurrence graph, top-k positives and negatives from ``dataset.train`` only."""
        c, n = self.config, self.n_items
        if dataset.n_items != n:
            raise ValueError(f"dimo: built for {n} items, fit on a dataset with {dataset.n_items}")
        rows, cols, counts = cooccurrence_counts(dataset.train, n, c.cooccur_window)
        degree = np.bincount(rows, weights=counts, minlength=n + 1)
        values = counts / np.maximum(degree[rows], 1)
        device = self.row_mask.device
        adj = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values.astype(np.float32)), (n + 1, n + 1),
            check_invariants=True,
        ).coalesce()
        pos_items, pos_weights = top_cooccurring(rows, cols, counts, n, c.top_k_cooccur)
        # negatives: deterministic given the run's torch seed (the trainer seeds torch before build + fit)
        rng = np.random.default_rng(torch.initial_seed())
        neg_items = sample_negatives(rows, cols, n, c.top_k_cooccur, rng)
        co_items = np.flatnonzero(degree[1:] > 0) + 1  # items with at least one co-occurring item: L_co anchors
        self.register_buffer("adjacency", adj.to(device), persistent=False)
        self.register_buffer("pos_items", torch.from_numpy(pos_items).to(device), persistent=False)
        self.register_buffer("pos_weights", torch.from_numpy(pos_weights).to(device), persistent=False)
        self.register_buffer("neg_items", torch.from_numpy(neg_items).to(device), persistent=False)
        self.register_buffer("co_items", torch.from_numpy(co_items).to(device), persistent=False)
        self._fitted = True
        self.drop_item_table_cache()

    # ----------------------------------------------------------------------------------------------- forward

    def _raw_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        id_table = self.id_emb.weight
        if self.adapter is not None:
            mo_table = self.adapter(self.item_features) * self.row_mask
        else:
            mo_table = self.mo_emb.weight
        return id_table, mo_table

    def _propagate(self, table: torch.Tensor) -> torch.Tensor:
        table = F.dropout(table, self.config.dropout, self.training)
        for _ in range(self.config.co_layers):
            table = table + torch.sparse.mm(self.adjacency, table)
        return table

    def item_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The propagated ID and modality tables, each ``[n_items + 1, d]`` (row 0 = 0)."""
        if not self._fitted:
            raise RuntimeError("dimo: call fit(dataset) before loss/score (it builds the co-occurrence graph)")
        # in evaluation (eval(), no autograd): propagated once per pass, see models.features.CachedItemTables
        return self.cached_item_tables(lambda: tuple(self._propagate(t) for t in self._raw_tables()),
                                       self.adjacency.device)

    def encode(self, batch: dict[str, torch.Tensor], tables=None) -> dict[str, torch.Tensor]:
        """Session vectors ``s_id``, ``s_mo`` and proxies ``p_id``, ``p_mo`` ([B, d] each), and the tables used."""
        id_table, mo_table = self.item_tables() if tables is None else tables
        history = batch["history"]
        lengths = batch["lengths"].clamp(min=1).clamp(max=history.shape[1])
        mask = (torch.arange(history.shape[1], device=history.device)[None, :] < lengths[:, None]) & (history > 0)
        mask[:, 0] |= ~mask.any(1)  # an all-padding row attends to its (zero) first slot instead of nothing
        last = (lengths - 1).to(torch.int64)
        maskf = mask.unsqueeze(-1).to(id_table.dtype)
        out = {"id_table": id_table, "mo_table": mo_table}
        for view, table, attention in (("id", id_table, self.id_attention), ("mo", mo_table, self.mo_attention)):
            seq = table[history] * maskf
            out[f"s_{view}"] = attention(seq, mask, last)
            out[f"p_{view}"] = seq.sum(1) / maskf.sum(1).clamp(min=1.0)
        return out

    def _logits(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores of items 1..n, ``[B, n_items]``."""
        return enc["s_id"] @ enc["id_table"][1:].t() + enc["s_mo"] @ enc["mo_table"][1:].t()

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._logits(self.encode(batch))
        pad = torch.full((logits.shape[0], 1), -torch.inf, dtype=logits.dtype, device=logits.device)
        return torch.cat([pad, logits], dim=1)

    # ----------------------------------------------------------------------------------------------- loss

    def weights(self) -> tuple[float, float, float]:
        c = self.config
        pick = lambda w: c.aux_weight if w is None else w  # noqa: E731
        return pick(c.co_weight), pick(c.proxy_weight), pick(c.counterfactual_weight)

    def criterion_flag(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """+1 where the target is among the top-k co-occurring items of any session item (training graph), else -1."""
        hit = (self.pos_items[history] == target[:, None, None]).flatten(1).any(1)  # padding rows hold only 0
        return torch.where(hit, 1.0, -1.0)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.loss_terms(batch).values())

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted loss terms ``ce``, ``co``, ``pro``, ``cri`` (their sum is :meth:`loss`)."""
        c = self.config
        w_co, w_pro, w_cri = self.weights()
        enc = self.encode(batch)
        target = batch["target"]
        terms = {"ce": F.cross_entropy(self._logits(enc), target - 1)}
        if w_co and len(self.co_items):
            terms["co"] = w_co * self._co_loss(enc["id_table"])
        if w_pro:
            terms["pro"] = w_pro * proxy_loss(
                enc["s_id"], enc["p_id"], enc["s_mo"], enc["p_mo"], self.proxy_maps, c.log_base, c.aux_reduction
            )
        if w_cri:
            flag = self.criterion_flag(batch["history"], target)
            terms["cri"] = w_cri * counterfactual_loss(
                enc["s_id"], enc["s_mo"], enc["id_table"][target], enc["mo_table"][target], flag, c.log_base,
                c.aux_reduction,
            )
        return terms

    def _co_loss(self, id_table: torch.Tensor) -> torch.Tensor:
        c = self.config
        n_co = len(self.co_items)
        if n_co > c.co_items_per_batch:
            items = self.co_items[torch.randint(n_co, (c.co_items_per_batch,), device=self.co_items.device)]
        else:
            items = self.co_items
        anchors = id_table[items]
        positives = (id_table[self.pos_items[items]] * self.pos_weights[items].unsqueeze(-1)).sum(1)
        negatives = id_table[self.neg_items[items]]
        loss = cooccurrence_loss(anchors, positives, negatives, c.log_base, "mean")
        # "sum": the released code sums over every item; the sampled mean times the item count estimates that sum
        return loss * n_co if c.aux_reduction == "sum" else loss
