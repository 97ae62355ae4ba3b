"""The checkpoint API of the engine: one safetensors file per model (+ optimizer, + JSON state) for the trainer
(:func:`save_checkpoint` / :func:`load_checkpoint`, defined in :mod:`distillrec.files` so that run folders can be read
below this layer), and one folder per resumable stage for the stage loop (:func:`save_stage_checkpoint` /
:func:`load_stage_checkpoint`): the trainable LM parts (``save_trainable``), the heads with the first optimizer,
one file per further optimizer, torch's RNG state and ``stage.json``, written atomically as one folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..files import atomic_save_tensors, load_checkpoint, read_state, save_checkpoint, write_folder_atomically

__all__ = ["TrainableParts", "load_checkpoint", "load_stage_checkpoint", "read_state", "save_checkpoint",
           "save_stage_checkpoint", "write_folder_atomically"]


class TrainableParts(Protocol):
    """What a stage trains besides its heads (a MultimodalLM: connector, summary tokens, LoRA towers)."""

    def save_trainable(self, path: str | Path) -> Any: ...

    def load_trainable(self, path: str | Path) -> None: ...


def save_stage_checkpoint(folder: Path, lm: TrainableParts | None, heads: nn.Module,
                          optimizers: list[torch.optim.Optimizer], state: dict[str, Any]) -> Path:
    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        if lm is not None:
            lm.save_trainable(tmp)
        save_checkpoint(tmp / "heads.safetensors", heads, state, optimizers[0] if optimizers else None)
        for k, o in enumerate(optimizers[1:], 1):
            save_checkpoint(tmp / f"optimizer{k}.safetensors", nn.Module(), {}, o)
        atomic_save_tensors(tmp / "rng.safetensors", {"torch": torch.get_rng_state()})
        (tmp / "stage.json").write_text(json.dumps(state, indent=1))

    return write_folder_atomically(folder, write)


def load_stage_checkpoint(folder: Path, lm: TrainableParts | None, heads: nn.Module,
                          optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    from safetensors.torch import load_file

    if lm is not None:
        lm.load_trainable(folder)
    state = load_checkpoint(folder / "heads.safetensors", heads, optimizers[0] if optimizers else None)
    for k, o in enumerate(optimizers[1:], 1):
        load_checkpoint(folder / f"optimizer{k}.safetensors", nn.Module(), o)
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    return state
