"""SASRec (Kang & McAuley, 2018): a causal self-attention encoder over the item sequence; the item embedding table
is also the output layer.

Follows RecBole's SASRec (its defaults, its initialisation, **post-LN** blocks: ``x = LN(x + Dropout(sublayer(x)))``
and an embedding LayerNorm + dropout before the first block, no sqrt(d) scaling of embeddings), written as compactly
as pmixer/SASRec.pytorch. Positions are absolute from the start of the right-padded window (position 0 = first item).

Speed: training is causal over whole windows (every position predicts its next item), not over RecBole's
prefix-augmented rows; attention uses ``scaled_dot_product_attention``; logits are only computed for positions
that have a target (see :class:`~.sequential.SequentialRecommender`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..data.dataset import Dataset
from .base import register_model
from .sequential import SequentialConfig, SequentialRecommender

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "swish": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class SASRecConfig(SequentialConfig):
    # RecBole SASRec defaults (max_len = RecBole's MAX_ITEM_LIST_LENGTH)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(2, ge=1)
    hidden_size: int = Field(64, ge=1)
    inner_size: int = Field(256, ge=1)
    hidden_dropout_prob: float = Field(0.5, ge=0.0, lt=1.0)
    attn_dropout_prob: float = Field(0.5, ge=0.0, lt=1.0)
    hidden_act: Literal["gelu", "relu", "swish", "tanh", "sigmoid"] = "gelu"
    layer_norm_eps: float = Field(1e-12, gt=0.0)
    initializer_range: float = Field(0.02, ge=0.0)
    max_len: int = Field(50, ge=1)  # number of positional embeddings: the longest window the model accepts

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> SASRecConfig:
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}; "
                             "give a hidden_size that n_heads divides")
        return self


class Block(nn.Module):
    """One post-LN transformer layer: causal multi-head self-attention, then a position-wise feed-forward."""

    def __init__(self, c: SASRecConfig):
        super().__init__()
        if c.hidden_size % c.n_heads:
            raise ValueError(f"sasrec: hidden_size {c.hidden_size} is not a multiple of n_heads {c.n_heads}")
        self.n_heads, self.attn_p = c.n_heads, c.attn_dropout_prob
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)  # q, k, v in one matmul
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.ln1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ff = nn.Sequential(
            nn.Linear(c.hidden_size, c.inner_size), _ACTIVATIONS[c.hidden_act](), nn.Linear(c.inner_size, c.hidden_size)
        )
        self.ln2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        # Causal mask only. With right padding a real position t only sees keys 0..t, which are all real items, so a
        # key-padding mask would change nothing there; it would only affect padding positions, whose outputs are
        # never used. is_causal=True lets SDPA pick its fused kernel instead of materialising a [B, L, L] mask.
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_p if self.training else 0.0, is_causal=True)
        x = self.ln1(x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, H))))
        return self.ln2(x + self.drop(self.ff(x)))

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The block's output at ``positions`` [B, k] only (evaluation: no dropout). Keys and values still cover
        every position, queries, projection and feed-forward only the k asked for: the last block of a scoring
        pass needs one position per row, not L."""
        B, L, H = x.shape
        k, h = positions.shape[1], self.n_heads
        w, b = self.qkv.weight, self.qkv.bias
        kv = F.linear(x, w[H:], b[H:]).view(B, L, 2, h, H // h).permute(2, 0, 3, 1, 4)
        xa = x.gather(1, positions[..., None].expand(B, k, H))
        q = F.linear(xa, w[:H], b[:H]).view(B, k, h, H // h).transpose(1, 2)
        causal = torch.arange(L, device=x.device)[None, None, :] <= positions[:, :, None]  # [B, k, L]
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=causal[:, None])
        xa = self.ln1(xa + self.proj(a.transpose(1, 2).reshape(B, k, H)))
        return self.ln2(xa + self.ff(xa))


@register_model("sasrec")
class SASRec(SequentialRecommender):
    Config = SASRecConfig

    def __init__(self, config: SASRecConfig, dataset: Dataset):
        super().__init__(config, dataset)
        self.item_dim = config.hidden_size
        self.item_emb = nn.Embedding(dataset.n_items + 1, config.hidden_size, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden_size)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.emb_drop = nn.Dropout(config.hidden_dropout_prob)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.apply(self._init_weights)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def _init_weights(self, m: nn.Module) -> None:
        # RecBole: N(0, initializer_range) for linear and embedding weights, zero biases, identity LayerNorms
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def encode(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        L = history.shape[1]
        if L > self.config.max_len:
            raise ValueError(
                f"sasrec: a window of {L} positions is longer than the model's max_len={self.config.max_len}; "
                "set the model's max_len to at least the training max_len"
            )
        x = F.embedding(history, table, padding_idx=0) + self.pos_emb.weight[:L]
        x = self.emb_drop(self.emb_ln(x))
        for block in self.blocks:
            x = block(x)
        return x  # [B, L, hidden_size]

    def encode_at(self, history: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.training:  # dropout: the full pass, so training draws the same random numbers as ever
            return super().encode_at(history, table, positions)
        L = history.shape[1]
        x = self.emb_ln(F.embedding(history, table, padding_idx=0) + self.pos_emb.weight[:L])
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1].forward_at(x, positions)

    def eval_window(self, history: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.config.max_len
        if history.shape[1] > m:
            # evaluation histories wider than the positional table: keep each row's last max_len items, left-aligned
            start = (lengths - m).clamp(min=0).to(history.device)
            history = history.gather(1, start[:, None] + torch.arange(m, device=history.device))
            lengths = lengths.clamp(max=m)
        return history, lengths
