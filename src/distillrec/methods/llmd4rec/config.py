"""LLMD4Rec's recipe (``configs/llmd4rec/*.yaml``): plain data, validated when it is read. The conventional model is
an ordinary run config (``crm: {model, train, eval}``, checked like ``distillrec train``'s: unknown model params,
ranges, ``max_len``); the LM block like every LM job's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...config import JobSettings, read_config
from ...data.loaders import DatasetConfig
from ...errors import ConfigError
from ...llm.builder import LMSpec, multimodal_config
from ...runs import ModelSpec, RunConfig, load_config
from ...training.stages import StageSettings

STAGES = ("crm_warmup", "rounds", "evaluate")
ADAPTER = "recommender"
RESERVED_BY = "the LLMD4Rec run (d_image, adapters, item_template)"
# text-only prompts: the (frozen, learned) "no image" soft token stands where an image would be
ITEM_TEMPLATE = "{instruction}{image}{img_sum}\n{text}{text_sum}"

USER_INSTRUCTION = "A shopper's suggestions and history, the latest item last. Summarise what the shopper will buy next."
HISTORY_LINE = "{k}. {text}"
SUGGESTIONS = "A recommender suggests: {items}."


class CRMBlock(BaseModel):
    """The conventional recommender: a run config without dataset and seeds (they come from the recipe)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="sasrec"))
    train: dict[str, Any] = Field(default_factory=dict)  # TrainConfig keys (epochs, lr, patience, max_len, ...)
    eval: dict[str, Any] = Field(default_factory=dict)  # EvalProtocol keys


class LLMStageConfig(StageSettings):
    """The LLM step of every round (LoRA; the shared stage settings)."""

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)


class LLMD4RecConfig(JobSettings):
    """``distillrec method llmd4rec CONFIG``: the settings block (seed, out, num_threads, device, progress) is shared
    by every job (:class:`~distillrec.config.JobSettings`)."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetConfig
    crm: CRMBlock = Field(default_factory=CRMBlock)
    crm_seeds: list[int] = Field(default_factory=lambda: [1], min_length=1)  # the final plain and distilled CRMs
    plain_dir: str | None = None  # the plain CRM run folder (default <out>/crm/plain); variants may share one

    lm: LMSpec = Field(default_factory=LMSpec)
    multimodal: dict[str, Any] = Field(default_factory=dict)  # MultimodalLMConfig fields (num_layers, lora_r, ...)
    text_fields: list[str] | None = None  # the item text (None: every text field)
    item_text_chars: int = Field(80, ge=8)
    history_len: int = Field(8, ge=1)  # the last items of a history in the prompt
    augment_top_k: int = Field(5, ge=0)  # the CRM's top-k items in the prompt as text (0: no augmentation)
    user_instruction: str = USER_INSTRUCTION
    item_instruction: str | None = None  # None: the user instruction (an item is embedded as a 1-item history)
    history_line: str = HISTORY_LINE
    suggestions: str = SUGGESTIONS
    llm_scale: float = Field(5.0, gt=0)  # LLM score = llm_scale * cos(user state, item embedding); fixed
    llm_negatives: int = Field(20, ge=0)  # items drawn uniformly per row, added to the LLM's own CE (not to the KL)
    item_batch_size: int = Field(32, ge=1)
    score_batch_size: int = Field(16, ge=1)

    # the distillation
    rounds: int = Field(2, ge=1)
    direction: Literal["mutual", "llm_to_crm"] = "mutual"  # llm_to_crm: the LLM step has no KL term (ablation)
    n_candidates: int = Field(20, ge=1)  # M: each row's candidates = its target + the CRM's top-M other items
    temperature: float = Field(2.0, gt=0)
    lambda_crm: float = Field(1.0, ge=0)  # lambda of the CRM step (LLM -> CRM)
    lambda_llm: float = Field(1.0, ge=0)  # lambda of the LLM step (CRM -> LLM)
    weighting: Literal["confidence", "uniform"] = "confidence"
    distill_users: int | None = Field(None, ge=1)  # training rows with teacher logits (None: every user)
    llm_users: int | None = Field(2000, ge=1)  # of those, the rows the LLM trains on (None: all of them)
    llm: LLMStageConfig = Field(default_factory=LLMStageConfig)
    autocast: Literal["off", "bf16"] = "off"
    save_every: int = Field(50, ge=1)

    # evaluation of the LLM recommender
    eval_users: int | None = Field(500, ge=1)  # test (and valid) rows ranked by the LLM, drawn by seed (None: all)
    out: str = "runs/llmd4rec"

    @field_validator("history_line")
    @classmethod
    def _line(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("must contain {text}")
        return v

    @field_validator("suggestions")
    @classmethod
    def _sugg(cls, v: str) -> str:
        if "{items}" not in v:
            raise ValueError("must contain {items}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> LLMD4RecConfig:
        multimodal_config(self.lm, self.multimodal, reserved_by=RESERVED_BY, d_image=1, adapters=[ADAPTER],
                          item_template=ITEM_TEMPLATE)
        self.crm_run_config(self.crm_seeds)  # the CRM block is a valid run config
        if len(set(self.crm_seeds)) != len(self.crm_seeds):
            raise ValueError(f"crm_seeds has a repeated seed {self.crm_seeds}")
        return self

    def crm_run_config(self, seeds: list[int], teacher: dict[str, Any] | None = None) -> RunConfig:
        """The CRM's run config on this dataset with ``seeds`` (and ``train.teacher``), validated like a
        ``distillrec train`` config."""
        train = {**self.crm.train, "seeds": list(seeds), "progress": self.progress,
                 "num_threads": self.num_threads}
        if "seeds" in self.crm.train or "teacher" in self.crm.train:
            raise ConfigError("crm.train: seeds and teacher are set by the LLMD4Rec run (crm_seeds, the rounds); "
                              "remove them")
        if teacher is not None:
            train["teacher"] = teacher
        raw = {"model": self.crm.model.model_dump(), "dataset": self.dataset.model_dump(), "train": train,
               "eval": self.crm.eval}
        try:
            return load_config(raw)
        except ConfigError as e:
            raise ConfigError(f"crm: {e}") from None


def load_llmd4rec_config(path: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> LLMD4RecConfig:
    return read_config(path, list(overrides), LLMD4RecConfig, "dataset, crm, lm, multimodal, rounds, ...")[0]
