"""Connector alignment's recipe (``configs/align/*.yaml``), validated when it is read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ...config import JobSettings, read_config
from ...data.loaders import DatasetConfig
from ...llm.builder import LMSpec, multimodal_config
from ...llm.multimodal import IMAGE_TOKEN
from ...training.stages import StageSettings

RESERVED_BY = "the alignment run (image_feature, lm; no LoRA)"


class AlignmentConfig(JobSettings, StageSettings):
    """Configuration of connector alignment (YAML recipes: ``configs/align/*.yaml``): the stage settings (epochs, lr,
    batch_size, ...), the shared job settings (seed, out, num_threads, device, progress) and the task below."""

    dataset: DatasetConfig
    image_feature: str = "effnet"  # a feature name of the item table ("image_clip", "attributes_onehot") or "effnet"
    image_encoder: str = "efficientnet-lite0"  # used when image_feature == "effnet" (the demo shop's PNG images)
    lm: LMSpec = Field(default_factory=LMSpec)  # "tiny" (random 2-layer Llama, tests), the bundled SmolLM2, any HF id
    multimodal: dict[str, Any] = Field(default_factory=dict)  # MultimodalLMConfig fields (connector, n_query, ...)
    epochs: int = Field(2, ge=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    max_items: int | None = Field(300, ge=1)  # training items (None: all that are not held out)
    heldout_frac: float = Field(0.1, gt=0, lt=1)
    max_heldout: int | None = Field(60, ge=2)
    missing_images: Literal["skip", "token"] = "skip"  # drop items without image, or give them the missing token
    prompt: str = f"{IMAGE_TOKEN} Describe this product."
    target_template: str = "{title}"  # str.format over the item's text fields (+ parsed title/categories/brand)
    strip_prefixes: list[str] = Field(default_factory=list)  # removed from the start of every text field value
    keyword_fields: list[str] = Field(default_factory=lambda: ["category"])
    max_keyword_df: float = Field(0.5, gt=0, le=1)
    max_answer_tokens: int = Field(32, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    n_examples: int = Field(8, ge=0)  # generations shown in the report
    save_every: int = Field(50, ge=1)  # steps between checkpoints (and at every epoch end)
    out: str = "runs/align"

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if v.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"prompt must contain {IMAGE_TOKEN} exactly once")
        return v

    @model_validator(mode="after")
    def _multimodal_block(self) -> AlignmentConfig:
        # every key of the block is checked now, not when the LM is built; the run sets the reserved ones
        multimodal_config(self.lm, self.multimodal, reserved_by=RESERVED_BY, d_image=1, adapters=[])
        return self


def load_alignment_config(path: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> AlignmentConfig:
    """Read a YAML recipe and apply ``key.sub=value`` overrides; errors name the key (ConfigError)."""
    return read_config(path, list(overrides), AlignmentConfig, "dataset, lm, multimodal, epochs, ...")[0]
