"""The method registry: every LLM method by name, with its stages and its entry point, for the one generic command
``distillrec method NAME CONFIG [--stage S ...] [--set k=v ...] [--out DIR] [--restart]`` (``distillrec tpad`` and
``distillrec align`` are its aliases).

An entry names its module lazily (``"package.module:function"``), so listing the methods imports no LM code. A method's
``main(config, overrides, *, stages, out, restart)`` reads its config, runs the stages (each resumable in the shared
stage loop) and writes its report into the run folder. What it produces for other models (item embeddings,
summaries) goes into files that a dataset attaches (``dataset.embeddings``), never through an import of the method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    stages: tuple[str, ...]  # in order; () = one stage, no --stage choice
    entry: str  # "module:function" with signature main(config, overrides, *, stages, out, restart) -> report
    example: str  # a recipe to start from

    def main(self) -> Callable[..., dict[str, Any]]:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


register_method(MethodSpec(
    "tpad", "Knowledge-MLLM, Transfer-MLLM, transitional pattern alignment (CLUB/MINE), one-time item embeddings",
    ("knowledge", "transfer", "align", "embed"), "distillrec.methods.tpad.pipeline:main", "configs/tpad/demo.yaml"))
register_method(MethodSpec(
    "mllm_msr", "MLLM-MSR: image summaries, recurrent preference summaries, a LoRA yes/no MLLM recommender",
    ("item_summaries", "preferences", "recommender", "evaluate"), "distillrec.methods.mllm_msr.pipeline:main",
    "configs/mllm_msr/demo.yaml"))
register_method(MethodSpec(
    "llmd4rec", "LLMD4Rec: mutual distillation between an LLM recommender and a CRM (SASRec), alternating rounds",
    ("crm_warmup", "rounds", "evaluate"), "distillrec.methods.llmd4rec.pipeline:main", "configs/llmd4rec/demo.yaml"))
register_method(MethodSpec(
    "align", "connector alignment pretraining: image features -> item text through the frozen LM",
    (), "distillrec.methods.connector_alignment.pipeline:main", "configs/align/demo.yaml"))


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def run_method(name: str, config: str | Path | dict[str, Any], overrides: Sequence[str] = (), *,
               stages: Sequence[str] = (), out: str | Path | None = None, restart: bool = False) -> dict[str, Any]:
    """Run method ``name`` (its stages up to the last one named; all by default)."""
    spec = get_method(name)
    unknown = [s for s in stages if s not in spec.stages]
    if unknown:
        have = ", ".join(spec.stages) if spec.stages else "none (it runs as one stage)"
        raise ConfigError(f"{name}: unknown stage(s) {unknown}; its stages: {have}")
    kwargs: dict[str, Any] = {"out": out, "restart": restart}
    if spec.stages:
        kwargs["stages"] = tuple(stages) or spec.stages
    return spec.main()(config, list(overrides), **kwargs)
