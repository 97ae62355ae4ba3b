"""The stage loop: one resumable, seeded, multi-optimiser training stage, shared by every LLM method (TPAD's three
stages, connector alignment, MLLM-MSR's LoRA fine-tuning, LLMD4Rec's distillation rounds).

A stage trains ``lm`` (a :class:`~distillrec.training.checkpoint.TrainableParts`, e.g. a MultimodalLM, or None) and
``heads`` (an ``nn.Module``) over ``n_units`` training units (items, pairs, prompts ...) with ``step_fn(indices,
rng) -> {loss name: float}``, which computes the loss and calls ``backward()``; the loop clips gradients, steps the
first optimizer (the others are the step function's own, e.g. MI estimators) and keeps the history.

Determinism: the order of epoch ``e`` is a permutation drawn from ``SeedSequence([seed, stage_id, e])`` and the
step's ``rng`` from ``SeedSequence([seed, stage_id, e, b])``; torch's RNG (dropout) is seeded with
``seed * 1000 + stage_id`` when the stage starts and saved in every checkpoint. So a stage killed at any step and
rerun resumes from its newest checkpoint (written atomically every ``save_every`` steps and at every epoch end) and
ends where an uninterrupted run ends. A finished stage is kept in ``<out>/<name>/final`` with its ``key`` (what its
result depends on): rerunning loads it instead of training, and a folder holding another config's checkpoint is an
error, not a silent mix.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import ConfigError
from .checkpoint import TrainableParts, load_stage_checkpoint, save_stage_checkpoint

CURVE_EVERY = 10  # steps per point of the training curves


class StageSettings(BaseModel):
    """The block every stage config extends (TPAD's ``knowledge``/``transfer``/``align``, alignment, ...)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, ge=0)  # None or 0: no clipping
    max_items: int | None = Field(None, ge=2)  # training units, drawn once by seed (None: all)
    steps_per_epoch: int | None = Field(None, ge=1)  # batches per epoch, each epoch a new draw (None: all units)


def config_key(obj: Any) -> str:
    """A short hash of a JSON-able description of what a result depends on."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """One resumable training stage in ``<out>/<name>`` (``checkpoint/`` while running, ``final/`` when done)."""

    def __init__(self, name: str, settings: StageSettings, out: Path, key: Any, *, seed: int, stage_id: int,
                 save_every: int = 50, progress: bool = True, full_batches: bool = True,
                 autocast: str | None = None, device: torch.device | str = "cpu"):
        self.name, self.settings = name, settings
        self.dir = Path(out) / name
        self.key = config_key(key)
        self.seed, self.stage_id = seed, stage_id
        self.save_every, self.progress = save_every, progress
        self.full_batches = full_batches  # contrastive losses need full batches; otherwise the last one is partial
        self.autocast, self.device = autocast, device  # "bf16": steps run under torch.autocast(bfloat16)

    @property
    def done_dir(self) -> Path:
        return self.dir / "final"

    def finished(self) -> bool:
        st = self.done_dir / "stage.json"
        return st.is_file() and json.loads(st.read_text()).get("key") == self.key

    def load_finished(self, lm: TrainableParts | None) -> dict[str, Any] | None:
        """A finished stage of this config: load its result into ``lm`` and return its state. Otherwise None (and an
        error when the folder holds an unfinished checkpoint of another config)."""
        if self.finished():
            if lm is not None:
                lm.load_trainable(self.done_dir)
            return json.loads((self.done_dir / "stage.json").read_text())
        ck = self.dir / "checkpoint" / "stage.json"
        if ck.is_file() and json.loads(ck.read_text()).get("key") != self.key:
            raise ConfigError(f"{self.dir} holds a checkpoint of another {self.name} config; use another 'out', "
                              "or --restart")
        return None

    def _save(self, folder: Path, lm, heads, opts, state: dict[str, Any]) -> None:
        save_stage_checkpoint(folder, lm, heads, opts, {**state, "key": self.key})

    def run(self, lm: TrainableParts | None, heads: nn.Module, opts: list[torch.optim.Optimizer], n_units: int,
            step_fn: Callable[[np.ndarray, np.random.Generator], dict[str, float]],
            evaluate: Callable[[], dict[str, Any]] | None = None, log: Callable[[str], None] = print, *,
            evaluate_before: bool = True, train_module: nn.Module | None = None,
            lr_at: Callable[[int, int], float] | None = None) -> dict[str, Any]:
        """Train to the end (or resume and finish). ``evaluate`` runs after every epoch and, with
        ``evaluate_before``, once before training (epoch 0), in eval mode under a forked RNG. ``train_module``: what
        ``.train()``/``.eval()`` toggle (default ``lm``). ``lr_at(step, total)``: the first optimizer's learning rate
        at each step (default: constant)."""
        from tqdm.auto import tqdm

        s = self.settings
        bs = s.batch_size
        n_batches = n_units // bs if self.full_batches else -(-n_units // bs)
        if s.steps_per_epoch is not None:
            n_batches = min(n_batches, s.steps_per_epoch)
        if n_batches == 0:
            raise ConfigError(f"{self.name}: {n_units} training units are fewer than batch_size {bs}; lower "
                              f"{self.name}.batch_size")
        total = n_batches * s.epochs
        module = train_module if train_module is not None else lm
        ck = self.dir / "checkpoint"
        state: dict[str, Any] = {"step": 0, "history": [], "running": {}, "curve": []}
        if (ck / "stage.json").is_file():
            state = load_stage_checkpoint(ck, lm, heads, opts)
            state.pop("key", None)
            log(f"{self.name}: resumed at step {state['step']}/{total}")
        else:  # dropout and the estimators' permutations draw from torch's RNG: seed it per stage
            torch.manual_seed(self.seed * 1000 + self.stage_id)

        def evaluated() -> dict[str, Any]:
            module.eval()
            with torch.random.fork_rng(devices=[]):
                row = evaluate()
            module.train()
            return row

        if state["step"] == 0 and evaluate is not None and evaluate_before:
            state["history"].append({"epoch": 0, **evaluated()})
        params = [p for o in opts[:1] for g in o.param_groups for p in g["params"]]
        bar = tqdm(total=total, initial=state["step"], desc=self.name, unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        t0 = t_epoch = time.perf_counter()
        while state["step"] < total:
            epoch, b = divmod(state["step"], n_batches)
            order = np.random.default_rng(np.random.SeedSequence([self.seed, self.stage_id, epoch])).permutation(
                n_units)
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.stage_id, epoch, b]))
            if lr_at is not None:
                for g in opts[0].param_groups:
                    g["lr"] = lr_at(state["step"], total)
            with autocast_context(self.autocast, self.device):
                losses = step_fn(order[b * bs:(b + 1) * bs], rng)
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opts[0].step()
            opts[0].zero_grad(set_to_none=True)
            state["step"] += 1
            run = state["running"]
            for k, v in losses.items():
                run.setdefault(k, []).append(v)
            end_of_epoch = state["step"] % n_batches == 0
            if state["step"] % CURVE_EVERY == 0 or end_of_epoch:  # training curve: means of the last steps
                state["curve"].append({"step": state["step"],
                                       **{k: float(np.mean(v[-CURVE_EVERY:])) for k, v in run.items()}})
            bar.update()
            bar.set_postfix({k: f"{np.mean(v[-20:]):.3f}" for k, v in list(run.items())[:3]})
            if end_of_epoch:
                row: dict[str, Any] = {"epoch": epoch + 1, **{k: float(np.mean(v)) for k, v in run.items()}}
                if evaluate is not None:
                    row.update(evaluated())
                row["seconds"] = round(time.perf_counter() - t_epoch, 2)
                t_epoch = time.perf_counter()
                state["history"].append(row)
                state["running"] = {}
                log(f"{self.name} epoch {epoch + 1}/{s.epochs}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "seconds"))
            if end_of_epoch or state["step"] % self.save_every == 0:
                self._save(ck, lm, heads, opts, state)
        bar.close()
        state["seconds"] = round(time.perf_counter() - t0, 2)
        self._save(self.done_dir, lm, heads, opts, {**state, "finished": True})
        shutil.rmtree(ck, ignore_errors=True)
        return state


def autocast_context(autocast: str | None, device: torch.device | str = "cpu"):
    """``torch.autocast`` in bfloat16 for ``"bf16"``, else a no-op context."""
    import contextlib

    if autocast in (None, "off"):
        return contextlib.nullcontext()
    if autocast != "bf16":
        raise ConfigError(f"autocast '{autocast}': use off or bf16")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()
