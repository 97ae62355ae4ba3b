"""One builder from (LM spec, :class:`MultimodalLMConfig`) to a :class:`MultimodalLM` on its device.

Every LM job (``distillrec embed``, TPAD's stages, connector alignment, the LLM recommenders of MLLM-MSR and LLMD4Rec)
builds its model here, so device choice, the tiny test model, load errors and the seeding of the randomly initialised
trainable parts (connector, ``missing_image``, summary tokens; LoRA B matrices start at zero) are the same everywhere.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ..errors import ConfigError
from .backbone import resolve_dtype
from .multimodal import BASE, MultimodalLM, MultimodalLMConfig

TINY = "tiny"  # a random 2-layer Llama with a small tokenizer, for tests


class LMSpec(BaseModel):
    """Which causal LM to load. In YAML either a mapping or just the name (``lm: tiny``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "smollm2-135m-instruct"  # bundled SmolLM2, a Hugging Face id / local folder, or "tiny" (tests)
    dtype: str = "float32"
    seed: int = 0  # seeds "tiny" and every randomly initialised trainable part (identical on every rank)
    cache_dir: str | None = None
    attn_implementation: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        resolve_dtype(v)
        return v


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available (``cuda:0`` outside torchrun), else the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device '{device}': {e}; use cpu, cuda, cuda:N or auto") from None


def multimodal_config(lm: LMSpec, fields: dict[str, Any] | MultimodalLMConfig | None = None, *,
                      reserved_by: str | None = None, **set_by_job: Any) -> MultimodalLMConfig:
    """``MultimodalLMConfig`` from a job's ``multimodal`` block, with ``base``/``dtype`` from ``lm`` and the fields the
    job decides (``d_image``, ``adapters``, ...). With ``reserved_by``, a block that sets one of those is an error."""
    given = fields.model_dump(exclude_unset=True) if isinstance(fields, MultimodalLMConfig) else dict(fields or {})
    job = {"base": lm.name, "dtype": lm.dtype, **set_by_job}
    if reserved_by:
        clash = sorted(set(given) & set(job))
        if clash:
            raise ConfigError(f"multimodal: {clash} are set by {reserved_by}; remove them from the multimodal block")
    try:
        return MultimodalLMConfig(**{**given, **job})
    except ValueError as e:
        raise ConfigError(f"multimodal: {e}") from None


def build_multimodal(lm: LMSpec, config: MultimodalLMConfig, *, device: str | torch.device | None = None,
                     seed: int | None = None, pretrained: str | Path | None = None) -> MultimodalLM:
    """The LM named by ``lm`` wrapped in a MultimodalLM built from ``config``, on ``device``; the trainable parts are
    initialised under ``seed`` (default ``lm.seed``) and, with ``pretrained`` (a ``save_trainable`` folder), loaded
    from it. Load problems are ConfigErrors that name ``lm.name``."""
    from .backbone import load_causal_lm, tiny_llama

    seed = lm.seed if seed is None else seed
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    try:
        if lm.name == TINY:
            tok, model = tiny_llama(seed=seed)
            model.to(device=dev, dtype=resolve_dtype(lm.dtype))
        else:
            tok, model = load_causal_lm(lm.name, lm.dtype, lm.cache_dir, device=dev,
                                        attn_implementation=lm.attn_implementation)
    except (OSError, ValueError, ModuleNotFoundError) as e:
        raise ConfigError(f"lm.name '{lm.name}': could not load the language model: {e}") from None
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a transformers API deprecated in v5
        torch.manual_seed(seed)
        try:
            mm = MultimodalLM(tok, model, config)
            if pretrained is not None:
                mm.load_trainable(pretrained)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"multimodal/pretrained: {e}") from None
    return mm


def pretrained_config(folder: str | Path) -> MultimodalLMConfig:
    """The MultimodalLMConfig saved in a ``save_trainable`` folder."""
    meta_path = Path(folder) / "config.json"
    if not meta_path.is_file():
        raise ConfigError(f"pretrained: '{meta_path}' not found (expected a folder written by save_trainable)")
    return MultimodalLMConfig(**json.loads(meta_path.read_text())["config"])


def check_adapter(mm: MultimodalLM, adapter: str) -> None:
    if adapter != BASE and adapter not in mm.config.adapters:
        raise ConfigError(f"adapter '{adapter}' is not one of the model's adapters {mm.config.adapters} "
                          f"(or '{BASE}' for the LM without LoRA)")
