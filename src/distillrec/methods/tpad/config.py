"""TPAD's recipe (``configs/tpad/*.yaml``): plain data, validated when it is read; unknown keys are errors that name
them, and a misspelt ``multimodal`` key or feature name is found before any feature is computed or model built."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ...config import JobSettings, read_config
from ...data.loaders import DatasetConfig
from ...llm.builder import LMSpec, multimodal_config
from ...training.stages import StageSettings
from .keywords import KeywordConfig

STAGES = ("knowledge", "transfer", "align", "embed")
KNOWLEDGE, TRANSFER = "knowledge", "transfer"


class TPADStageSettings(StageSettings):
    batch_size: int = Field(16, ge=2)  # InfoNCE needs in-batch negatives


class KnowledgeConfig(TPADStageSettings):
    modality_dropout: float = Field(0.3, ge=0, lt=1)
    gr_items: int = Field(48, ge=0)  # held-out items for the keyword generation rate
    gr_max_new_tokens: int = Field(20, ge=1)


class TransferConfig(TPADStageSettings):
    max_order: int = Field(3, ge=1)  # K: pairs (t, t + k), k = 1..K
    max_len: int = Field(50, ge=2)  # the last items of each training sequence that pairs are drawn from
    context_items: int = Field(2, ge=0)  # earlier items of the session named in the anchor's prompt
    instruction: str = "Read the item below; the user will look at a related item next."
    heldout_pairs: int = Field(256, ge=0)  # validation transitions for the held-out retrieval curve (0: none)


class AlignConfig(TPADStageSettings):
    gamma1: float = Field(0.1, ge=0)  # CLUB (minimised)
    gamma2: float = Field(0.1, ge=0)  # MINE (maximised)
    d_proj: int = Field(64, ge=2)
    estimator_hidden: int = Field(64, ge=2)
    estimator_lr: float = Field(1e-3, gt=0)
    q_steps: int = Field(3, ge=1)
    club: Literal["full", "sampled"] = "sampled"
    mine_ma_rate: float | None = 0.01
    modality_dropout: float = Field(0.3, ge=0, lt=1)
    # the lower bound maximised between D_L(h) and D_T(t): the seed's MINE, or InfoNCE on cosines (geometric)
    lower_bound: Literal["mine", "cosine_infonce"] = "mine"
    # weight of the neighbourhood distillation from the Transfer states straight into h (no projector between them:
    # model.similarity_distillation); 0 = the seed's loss alone
    gamma3: float = Field(0.0, ge=0)
    # > 1: each batch is batch_size / neighbour_batches items drawn as usual, each with neighbour_batches - 1 of its
    # nearest items in the Transfer states (drawn from its 2 x as many nearest), so the batch holds the close
    # neighbourhoods that gamma3 distils (a random batch of 16 from 1,585 items rarely does); 0 or 1: plain batches
    neighbour_batches: int = Field(0, ge=0)
    freeze_dt: bool = False  # D_T (the Transfer side's projector) stays at its seeded initialisation
    # "h": export [h_img; h_txt]; "h_dl": also D_L(h), the projection MINE aligns with D_T(t) (feature tpad_distilled)
    export: Literal["h", "h_dl"] = "h"


class TPADConfig(JobSettings):
    """``distillrec tpad`` recipe; the settings block (seed, out, num_threads, device, progress) is shared by every
    job (:class:`~distillrec.config.JobSettings`)."""

    dataset: DatasetConfig
    lm: LMSpec = Field(default_factory=LMSpec)
    multimodal: dict[str, Any] = Field(default_factory=dict)  # MultimodalLMConfig fields (connector, num_layers...)
    image_features: str | None = "image_effnet_lite0"  # an item feature (image_clip) or the bundled encoder's
    text_fields: list[str] | None = None  # None: every text field
    text_view: str | None = "text_minilm"  # frozen text feature for L^t (text_minilm is computed); None: no L^t
    use_image: bool = True
    use_text: bool = True
    towers: Literal["two", "single"] = "two"
    contrast_weight: float = Field(0.1, ge=0)
    temperature: float = Field(0.1, gt=0)
    d_contrast: int = Field(128, ge=2)
    keywords: KeywordConfig = Field(default_factory=KeywordConfig)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    embed_batch_size: int = Field(32, ge=1)
    save_every: int = Field(50, ge=1)  # steps between checkpoints (and at every epoch end)
    autocast: Literal["off", "bf16"] = "off"  # the LM stages' steps under torch.autocast(bfloat16)
    probe: bool = True  # the transition probe of every item representation at the end (report: "Probe")
    # with the probe: MINE / vCLUB estimates between the Transfer states and what is exported, from estimators fitted
    # afresh after training (mutual_information.fitted_mi_estimates; ~10 s per representation on one CPU thread)
    probe_mi: bool = False
    out: str = "runs/tpad"

    @model_validator(mode="after")
    def _multimodal_block(self) -> TPADConfig:
        # every key of the block is checked now, not when the LM is built; the run sets the reserved ones
        multimodal_config(self.lm, self.multimodal, reserved_by="the TPAD run (lm, image_features, towers)",
                          d_image=1, adapters=[KNOWLEDGE, TRANSFER])
        return self


def load_tpad_config(path: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> TPADConfig:
    return read_config(path, list(overrides), TPADConfig, "dataset, lm, multimodal, knowledge, transfer, align")[0]
