"""GRU4Rec (Hidasi et al., 2016) as in RecBole: embed -> dropout -> GRU -> dense back to the embedding size, and
score every item by a dot product with its embedding (the embedding table is also the output layer).

Trained causally: every position t of a window predicts the next item, which equals RecBole's prefix-augmented
training for the positions whose history fits in one window, at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.dataset import Dataset
from .base import register_model
from .sequential import SequentialConfig, SequentialRecommender


class GRU4RecConfig(SequentialConfig):
    # RecBole GRU4Rec defaults
    embedding_size: int = Field(64, ge=1)
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout_prob: float = Field(0.3, ge=0.0, lt=1.0)


@register_model("gru4rec")
class GRU4Rec(SequentialRecommender):
    Config = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig, dataset: Dataset):
        super().__init__(config, dataset)
        self.item_dim = config.embedding_size
        self.item_emb = nn.Embedding(dataset.n_items + 1, config.embedding_size, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout_prob)
        # bias-free GRU, as RecBole's
        self.gru = nn.GRU(config.embedding_size, config.hidden_size, config.num_layers, bias=False, batch_first=True)
        # back to the embedding size so the sequence vector can be dotted with item embeddings
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        # RecBole's initialisation: xavier-normal embeddings, xavier-uniform GRU weights (all layers here)
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        for name, w in self.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(w)

    def encode(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        # padding_idx=0: the padding row gets no gradient even when the table is computed (fused variants)
        x = self.emb_dropout(F.embedding(history, table, padding_idx=0))
        # a plain GRU over right-padded rows: outputs before each row's length never see the padding after it,
        # and plain is faster on CPU than pack_padded_sequence
        out, _ = self.gru(x)
        return self.dense(out)  # [B, L, embedding_size]
