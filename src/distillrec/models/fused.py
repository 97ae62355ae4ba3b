"""GRU4Rec and SASRec with frozen item features (e.g. CLIP text and image embeddings) fused into the item table.

Each item's vector is ``ID embedding + sum_f adapter_f(feature_f)`` (fusion "add"), or a Linear over their
concatenation (fusion "concat"); ``use_id=False`` drops the ID embedding, so items never seen in training still get a
meaningful vector from their features (cold start). The fused table replaces the ID table everywhere, as the input
embedding and as the output (scoring) layer, so the networks themselves are exactly GRU4Rec's and SASRec's: only
``item_table()`` is overridden.

The feature matrices are registered as **non-persistent** buffers: they move with ``.to(device)`` and are never
trained, but they stay out of checkpoints. They are a function of the dataset, which is needed anyway to build the
model (``cls(config, dataset)``), so saving them would only copy tens of MB of CLIP rows into every checkpoint. The
features, adapters and the evaluation-time table cache are :mod:`.features`, shared with DIMO's modality view.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..data.dataset import Dataset
from .base import ModelConfig, register_model
from .features import CachedItemTables, FeatureNorm, frozen_features, make_adapter, padding_row_mask
from .gru4rec import GRU4Rec, GRU4RecConfig
from .sasrec import SASRec, SASRecConfig


class FusionConfig(ModelConfig):
    features: list[str] = Field(min_length=1)  # names in dataset.items.features, e.g. ["text_clip", "image_clip"]
    fusion: Literal["add", "concat"] = "add"
    use_id: bool = True  # False: features only (cold-start items)
    adapter_layernorm: bool = True  # LayerNorm after each adapter's Linear: CLIP and text features differ in scale
    adapter_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # "standardize": each feature column to mean 0 / std 1 over the items before the adapter (models.features); "none"
    feature_norm: FeatureNorm = "standardize"


class FusedGRU4RecConfig(GRU4RecConfig, FusionConfig):
    pass


class FusedSASRecConfig(SASRecConfig, FusionConfig):
    pass


class FusedItems(CachedItemTables):
    """Mixin placed before GRU4Rec / SASRec: adds the frozen features and adapters, overrides ``item_table``."""

    def _init_fusion(self, c: FusionConfig, dataset: Dataset) -> None:
        raw = frozen_features(self.name, dataset, c.features, c.feature_norm,
                              "attach one with ItemTable.add_features or the dataset's embeddings setting")
        d = self.item_dim
        gain = float(self.item_emb.weight[1:].detach().std())  # the ID table's init scale (each model's own init)
        for i, m in enumerate(raw):
            # attribute-safe names (feature names may hold dots); row 0 of every matrix is padding
            self.register_buffer(f"feature_{i}", torch.as_tensor(m), persistent=False)
        self.adapters = nn.ModuleList(
            make_adapter(m.shape[1], d, layernorm=c.adapter_layernorm, gain=gain, dropout=c.adapter_dropout)
            for m in raw
        )
        n_parts = len(c.features) + int(c.use_id)
        self.fuse = nn.Linear(n_parts * d, d) if c.fusion == "concat" else None
        if not c.use_id:
            self.item_emb = None  # features only: no per-item parameters at all
        # zeroes the padding row of the fused table (adapter biases and LayerNorm would otherwise make it non-zero)
        self.register_buffer("row_mask", padding_row_mask(dataset.n_items), persistent=False)

    def _fused_table(self) -> torch.Tensor:
        feats = [getattr(self, f"feature_{i}") for i in range(len(self.adapters))]
        parts = [adapter(f) for adapter, f in zip(self.adapters, feats)]
        if self.item_emb is not None:
            parts.insert(0, self.item_emb.weight)
        table = self.fuse(torch.cat(parts, dim=-1)) if self.fuse is not None else torch.stack(parts).sum(0)
        return table * self.row_mask

    def item_table(self) -> torch.Tensor:
        # in evaluation (eval(), no autograd): built once per pass, see models.features.CachedItemTables
        return self.cached_item_tables(self._fused_table)

    @property
    def content_item_vectors(self) -> bool:
        return True  # every item's vector has its features' part, trained or not


@register_model("fused_gru4rec")
class FusedGRU4Rec(FusedItems, GRU4Rec):
    Config = FusedGRU4RecConfig

    def __init__(self, config: FusedGRU4RecConfig, dataset: Dataset):
        super().__init__(config, dataset)
        self._init_fusion(config, dataset)


@register_model("fused_sasrec")
class FusedSASRec(FusedItems, SASRec):
    Config = FusedSASRecConfig

    def __init__(self, config: FusedSASRecConfig, dataset: Dataset):
        super().__init__(config, dataset)
        self._init_fusion(config, dataset)
