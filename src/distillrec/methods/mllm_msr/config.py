"""MLLM-MSR's recipe (``configs/mllm_msr/*.yaml``): plain data, validated when it is read (unknown keys and misspelt
``multimodal`` keys are errors that name them)."""

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

STAGES = ("item_summaries", "preferences", "recommender", "evaluate")
ADAPTER = "recommender"
RESERVED_BY = "the MLLM-MSR run (image_features, the recommender adapter)"

# Our wording of the official prompts (reference/papers.md section 3.3), for a small instruct model and any item kind.
IMAGE_SUMMARY_PROMPT = f"{IMAGE_TOKEN} Describe this item's picture in one short sentence."
FIRST_BLOCK = ("A user interacted with these items, in this order:\n{items}\nBased on these items, summarise the "
               "user's preferences in one short paragraph. Start with 'The user appears to have a preference for'.")
NEXT_BLOCK = ("We already know this user's previous preference: {previous}\nThe user then interacted with these items, "
              "in this order:\n{items}\nTaking both into account, summarise the user's preferences in one short "
              "paragraph. Start with 'The user appears to have a preference for'.")
ITEM_LINE = "{k}. Title: '{title}'"
IMAGE_LINE = ". Picture: {summary}"
RECOMMEND = ("Based on the previous interaction history, the user's preference can be summarised as: {preference}\n"
             "Candidate item: '{title}'{image}.\nWill the user interact with this item next? Answer yes or no.")


class RecommenderStageConfig(StageSettings):
    """LoRA SFT of the yes/no recommender (the shared stage settings: epochs, batch_size, lr, ...)."""

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)


class MLLMMSRConfig(JobSettings):
    """``distillrec method mllm_msr CONFIG``: the settings block (seed, out, num_threads, device, progress) is shared by
    every job (:class:`~distillrec.config.JobSettings`)."""

    dataset: DatasetConfig
    lm: LMSpec = Field(default_factory=LMSpec)
    multimodal: dict[str, Any] = Field(default_factory=dict)  # MultimodalLMConfig fields (num_layers, lora_r, ...)
    connector: str | None = None  # a connector alignment run's connector/ folder (`distillrec align`)
    allow_unaligned_connector: bool = False  # tests: image summaries from a random connector
    image_features: str | None = "image_effnet_lite0"  # None: a text-only dataset (no image tokens, no summaries)
    text_fields: list[str] | None = None  # the item's "title" in every prompt (None: every text field)
    item_text_chars: int = Field(120, ge=8)  # each item's text cut to this many characters in prompts

    # the summariser: the same LM without LoRA, frozen, writing stages 1 and 2 (the paper uses LLaVA and Llama-3-8B
    # there); its own depth, since a truncated LM that can still be fine-tuned to say yes/no cannot write a sentence
    summariser_num_layers: int | None = Field(None, ge=1)  # None: all layers

    # stage 1: image summaries
    image_summary: bool = True  # False: the MLLM-MSR_I ablation (preferences from item text only)
    image_summary_prompt: str = IMAGE_SUMMARY_PROMPT
    image_summary_tokens: int = Field(32, ge=1)
    summary_batch_size: int = Field(16, ge=1)
    summary_dir: str | None = None  # the summary cache (default <out>/summaries); variants and seeds may share one

    # stage 2: preference summaries
    preference: Literal["recurrent", "direct"] = "recurrent"  # direct: the MLLM-MSR_R ablation, one prompt
    block_size: int = Field(3, ge=1)
    history_len: int = Field(6, ge=1)  # the last items before the target that are summarised
    preference_tokens: int = Field(64, ge=1)
    first_block_prompt: str = FIRST_BLOCK
    next_block_prompt: str = NEXT_BLOCK

    # users and candidates
    train_users: int | None = Field(400, ge=1)  # users whose last training item is an SFT target (None: all)
    eval_users: int | None = Field(200, ge=1)  # users ranked on valid and test (None: all), drawn by seed
    n_negatives: int = Field(20, ge=1)  # test and validation: 1 positive + n_negatives candidates
    train_negatives: int = Field(1, ge=1)  # SFT: negatives per positive (1:1 in the paper)

    # stage 3: the recommender
    recommend_prompt: str = RECOMMEND
    recommender: RecommenderStageConfig = Field(default_factory=RecommenderStageConfig)
    autocast: Literal["off", "bf16"] = "off"
    zero_shot: bool = True  # also score the test candidates with the LM before SFT (the paper's "w/o SFT" row)
    kv_cache: bool = True  # score a user's candidates with the shared prefix's key/value cache
    save_every: int = Field(50, ge=1)

    # stage 4: evaluation on the same candidates
    baselines: list[str] = Field(default_factory=list)  # finished `distillrec train` run folders, scored alike
    rerank: str | None = None  # a run folder whose top-N (full ranking) MLLM-MSR re-ranks
    rerank_top_n: int = Field(20, ge=2)
    out: str = "runs/mllm_msr"

    @field_validator("image_summary_prompt")
    @classmethod
    def _image_prompt(cls, v: str) -> str:
        if v.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"image_summary_prompt must contain {IMAGE_TOKEN} exactly once")
        return v

    @field_validator("first_block_prompt", "next_block_prompt", "recommend_prompt")
    @classmethod
    def _fields(cls, v: str, info: Any) -> str:
        need = {"first_block_prompt": ["{items}"], "next_block_prompt": ["{previous}", "{items}"],
                "recommend_prompt": ["{preference}", "{title}", "{image}"]}[info.field_name]
        missing = [k for k in need if k not in v]
        if missing:
            raise ValueError(f"must contain {', '.join(missing)}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> MLLMMSRConfig:
        multimodal_config(self.lm, self.multimodal, reserved_by=RESERVED_BY, d_image=1, adapters=[ADAPTER])
        return self

    @property
    def uses_images(self) -> bool:
        return self.image_features is not None

    @property
    def summarises_images(self) -> bool:
        return self.uses_images and self.image_summary


def load_mllm_msr_config(path: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> MLLMMSRConfig:
    return read_config(path, list(overrides), MLLMMSRConfig, "dataset, lm, multimodal, recommender, ...")[0]
