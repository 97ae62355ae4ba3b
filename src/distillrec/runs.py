"""Run folders in one place: what ``distillrec train`` writes, where, and how to read it back.

A run folder holds ``config.yaml`` (the resolved :class:`RunConfig`), ``metrics.json``, ``report.md``, ``train.log``,
``curves.png``, per-row ranks ``ranks/{valid,test}_seed<S>.npy`` (for paired tests) and
``checkpoints/seed<S>/{last,best}.safetensors``. No path in it is absolute, so a folder copied elsewhere still loads.

:func:`load_trained` is the one way to get a trained model back (used by ``distillrec evaluate``, ``recommend``, the
benchmarks and serving): the run's config, its dataset with the features the model names, and the best-validation
weights of one seed. This module sits between ``evaluation`` and ``training`` in the layer order: the engine writes
run folders through it, and serving reads them without importing the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import RuntimeSettings, format_validation_error, read_config
from .data.dataset import Dataset
from .data.loaders import DatasetConfig, load_dataset
from .errors import ConfigError
from .evaluation.evaluator import EvalProtocol


# ------------------------------------------------------------------------------------------------------ the config
class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TeacherConfig(BaseModel):
    """Knowledge distillation from a teacher's cached logits (``train.teacher``; absent = off, the plain trainer).

    ``path`` names a teacher-logits file (:mod:`distillrec.training.teacher`: training rows, candidate items with the
    target first, the teacher's logits over them, the dataset fingerprint). Each training batch then adds
    ``weight * sum_s w_s * temperature^2 * KL(p_teacher^T || p_model^T)`` over the file's rows whose target the batch
    trains on, both distributions over the same candidates; ``w_s`` = the teacher's probability of the target,
    normalised to sum 1 over the batch's rows (``confidence``), or 1/rows (``uniform``). Training only: the model, its
    checkpoints, evaluation and serving are those of a plain run. ``sha256``, when given, must be the file's."""

    model_config = ConfigDict(extra="forbid")

    path: str
    weight: float = Field(1.0, ge=0)  # lambda; 0 trains exactly the plain model
    temperature: float = Field(1.0, gt=0)
    weighting: Literal["confidence", "uniform"] = "confidence"
    sha256: str | None = None


class TrainConfig(RuntimeSettings):
    """Training settings; ``num_threads``, ``device`` and ``progress`` are the runtime settings every job shares.
    The recommender trainer runs on the CPU (under torchrun: one process per core); ``device`` may only say so."""

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, ge=0)
    patience: int = Field(5, ge=1)  # epochs without a better validation metric before stopping
    max_len: int = Field(50, ge=1)  # the most recent items a model sees
    # batches of similar lengths (less padding work, faster) change the optimisation: on Scientific SASRec they
    # cost about 0.004 test NDCG@10 (README), so they are opt-in
    bucket_by_length: bool = False
    seeds: list[int] = Field(default_factory=lambda: [2024], min_length=1)
    teacher: TeacherConfig | None = None  # knowledge distillation from cached teacher logits (off by default)

    @field_validator("device")
    @classmethod
    def _cpu_only(cls, v: str | None) -> str | None:
        if v not in (None, "cpu", "auto"):
            raise ValueError(f"the recommender trainer runs on the CPU; '{v}' is not supported yet (use cpu or leave "
                             "it out; the LM jobs -- tpad, align, embed -- take a GPU)")
        return v


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSpec
    dataset: DatasetConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalProtocol = Field(default_factory=EvalProtocol)

    @model_validator(mode="after")
    def _unique_seeds(self) -> RunConfig:
        if len(set(self.train.seeds)) != len(self.train.seeds):
            raise ValueError(f"train.seeds has a repeated seed {self.train.seeds}; give each seed once")
        return self

    def feature_names(self) -> list[str]:
        names = self.model.params.get("features") or []
        return [names] if isinstance(names, str) else list(names)


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run config: its keys, value ranges, the model's own hyperparameters (its ``Config``),
    the dataset's loader options, and the model's ``max_len`` against ``train.max_len`` -- all before anything is
    loaded or computed. Every problem is a ConfigError that names the key and the fix."""
    cfg, name = read_config(source, overrides, RunConfig, "model, dataset, train, eval")
    from .data.loaders import validate_loader_options
    from .models import get_model_class

    try:
        cls = get_model_class(cfg.model.name)
    except KeyError as e:
        raise ConfigError(f"{name}: model.name: {e.args[0]}") from None
    try:
        model_cfg = cls.Config(**cfg.model.params)
    except ValidationError as e:
        msg = format_validation_error(e, f"{name}: model.params of '{cfg.model.name}'", "model.params.")
        if any(err["type"] == "extra_forbidden" for err in e.errors()):
            msg += f" (its keys: {', '.join(cls.Config.model_fields)})"
        raise ConfigError(msg) from None
    model_len = getattr(model_cfg, "max_len", None)
    if model_len is not None and cfg.train.max_len > model_len:
        raise ConfigError(f"{name}: train.max_len={cfg.train.max_len} is longer than the model's max_len={model_len} "
                          f"(its positional table); set model.params.max_len: {cfg.train.max_len} or lower "
                          "train.max_len")
    if cfg.dataset.options:
        validate_loader_options(cfg.dataset.format or cfg.dataset.name, cfg.dataset.options)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json")
    if data["train"].get("teacher") is None:  # a plain run's config.yaml is what it was before train.teacher existed
        data["train"].pop("teacher", None)
    if data["dataset"].get("encoder_text_fields") is None:  # likewise for dataset.encoder_text_fields
        data["dataset"].pop("encoder_text_fields", None)
    return yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------------------ the folder
@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def ranks_dir(self) -> Path:
        return self.root / "ranks"

    def ranks(self, split: str, seed: int) -> Path:
        return self.ranks_dir / f"{split}_seed{seed}.npy"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, seed: int, which: str = "best") -> Path:
        return self.checkpoints_dir / f"seed{seed}" / f"{which}.safetensors"

    # what `train` writes: --restart removes these and nothing else
    def outputs(self) -> list[Path]:
        return [self.config, self.metrics, self.report, self.log, self.curves, self.ranks_dir, self.checkpoints_dir]

    def read_config(self) -> RunConfig:
        if not self.root.is_dir():
            raise ConfigError(f"run folder '{self.root}' not found; give a folder written by `distillrec train`")
        if not self.config.is_file():
            raise ConfigError(f"'{self.root}' is not a run folder (no config.yaml); give a folder written by "
                              "`distillrec train`")
        return load_config(self.config)

    def read_metrics(self) -> dict[str, Any]:
        if not self.metrics.is_file():
            raise ConfigError(f"{self.metrics} not found: '{self.root}' is not a finished run (train it to the end, "
                              "or rerun `distillrec train` on it to resume)")
        return json.loads(self.metrics.read_text())

    def read_ranks(self, split: str, seed: int) -> np.ndarray:
        path = self.ranks(split, seed)
        if not path.is_file():
            raise ConfigError(f"{path} not found: seed {seed} of '{self.root}' did not finish")
        return np.load(path, allow_pickle=False)


# ------------------------------------------------------------------------------------------------ loading it back
def check_feature_names(cfg: RunConfig, dataset: Dataset) -> None:
    """Every feature the model names exists in the dataset or is one the bundled encoders compute."""
    from .features.cache import DEFAULT_FEATURES

    have = set(dataset.items.features)
    unknown = [n for n in cfg.feature_names() if n not in have and n not in DEFAULT_FEATURES]
    if unknown:
        raise ConfigError(f"model.params.features: unknown feature(s) {unknown} for dataset '{dataset.name}'; it has "
                          f"{sorted(have) or 'none'}, and {sorted(DEFAULT_FEATURES)} are computed on demand")


def load_run_dataset(cfg: RunConfig, dataset: Dataset | None = None) -> Dataset:
    """The run's dataset (loaded from ``cfg.dataset`` unless given) with the default encoders' features that the
    model names (``text_minilm``, ``image_effnet_lite0``) computed when absent, through the feature cache. A feature
    name that is neither is an error before anything is computed."""
    from .features.cache import encode_missing_features

    dataset = dataset if dataset is not None else load_dataset(cfg.dataset)
    check_feature_names(cfg, dataset)
    fields = cfg.dataset.encoder_text_fields
    unknown = [f for f in fields or [] if f not in dataset.items.text]
    if unknown:
        raise ConfigError(f"dataset.encoder_text_fields: unknown text field(s) {unknown} for dataset "
                          f"'{dataset.name}'; it has {sorted(dataset.items.text) or 'none'}")
    encode_missing_features(dataset.items, cfg.feature_names(), fields, show_progress=cfg.train.progress)
    return dataset


@dataclass
class TrainedModel:
    model: Any  # a Recommender in eval mode, best-validation weights loaded
    dataset: Dataset
    config: RunConfig
    seed: int


def load_trained(run_dir: str | Path, seed: int | None = None, dataset: Dataset | None = None) -> TrainedModel:
    """The best-validation model of ``run_dir`` for ``seed`` (default: the config's first seed)."""
    import torch

    from .files import load_checkpoint
    from .models import build_model

    folder = RunFolder(Path(run_dir))
    cfg = folder.read_config()
    seed = cfg.train.seeds[0] if seed is None else seed
    if seed not in cfg.train.seeds:
        raise ConfigError(f"seed {seed} is not a seed of '{folder.root}' (its seeds: {cfg.train.seeds})")
    dataset = load_run_dataset(cfg, dataset)
    torch.manual_seed(seed)
    model = build_model(cfg.model.name, cfg.model.params, dataset)
    model.fit(dataset)
    if model.trainable:
        best = folder.checkpoint(seed)
        if not best.exists():
            raise ConfigError(f"{best} not found: seed {seed} of '{folder.root}' did not finish; rerun "
                              "`distillrec train` on it to resume")
        load_checkpoint(best, model)
    model.eval()
    return TrainedModel(model, dataset, cfg, seed)


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Re-evaluate the best checkpoints of a finished run on valid and test (returns per-seed and mean metrics)."""
    from .evaluation.evaluator import rank_examples, rank_valid_and_test, summarise
    from .evaluation.metrics import aggregate_seeds

    folder = RunFolder(Path(run_dir))
    cfg = folder.read_config()
    dataset = load_run_dataset(cfg)
    per_seed = []
    for seed in cfg.train.seeds:
        trained = load_trained(folder.root, seed, dataset)
        out: dict[str, Any] = {"seed": seed}
        if len(dataset.valid) == len(dataset.test):
            ranks = rank_valid_and_test(trained.model, dataset.valid, dataset.test, cfg.eval, cfg.train.max_len)
        else:
            ranks = tuple(rank_examples(trained.model, ex, cfg.eval, cfg.train.max_len)
                          for ex in (dataset.valid, dataset.test))
        for split, r in zip(("valid", "test"), ranks):
            out[split] = summarise(r, getattr(dataset, split), dataset, cfg.eval, with_slices=False)["metrics"]
        per_seed.append(out)
    return {
        "model": cfg.model.name,
        "dataset": dataset.name,
        "valid": {k: v["mean"] for k, v in aggregate_seeds([s["valid"] for s in per_seed]).items()},
        "test": {k: v["mean"] for k, v in aggregate_seeds([s["test"] for s in per_seed]).items()},
        "seeds": per_seed,
    }


# ------------------------------------------------------------------------------------- sampled candidates (MLLM-MSR)
def score_run_on_candidates(run_dir: str | Path, cands: Any, seed: int | None = None,
                            dataset: Dataset | None = None) -> np.ndarray:
    """float32 [n, C] scores of a run's best-validation model (``seed``: default the config's first) on a
    :class:`~distillrec.evaluation.candidates.CandidateSet` (column 0 = the target), histories cut to the run's
    ``train.max_len``. The candidates must come from the run's dataset (a DataError otherwise)."""
    from .evaluation.candidates import score_candidates

    trained = load_trained(run_dir, seed, dataset)
    cands.check(trained.dataset)
    return score_candidates(trained.model, cands.examples(trained.dataset), cands, trained.config.train.max_len,
                            trained.config.eval.batch_size)


def evaluate_run_on_candidates(run_dir: str | Path, candidates: str | Path) -> dict[str, Any]:
    """Every seed of a finished run scored on a saved candidate file (``distillrec evaluate RUN --candidates F``):
    the sampled protocol (labelled as such), candidate metrics per seed, and their mean and 95% CI over seeds."""
    from .evaluation.candidates import CandidateSet, candidate_metrics
    from .evaluation.evaluator import sampled_protocol
    from .evaluation.metrics import aggregate_seeds

    folder = RunFolder(Path(run_dir))
    cfg = folder.read_config()
    dataset = load_run_dataset(cfg)
    cands = CandidateSet.load(candidates, dataset)
    per_seed = []
    for seed in cfg.train.seeds:
        metrics = candidate_metrics(score_run_on_candidates(folder.root, cands, seed, dataset))
        metrics.pop("n")
        per_seed.append({"seed": seed, **metrics})
    agg = aggregate_seeds([{k: v for k, v in s.items() if k != "seed"} for s in per_seed])
    return {
        "protocol": sampled_protocol(cands),
        "model": cfg.model.name,
        "dataset": dataset.name,
        "split": cands.split,
        "n": len(cands),
        "mean": {k: v["mean"] for k, v in agg.items()},
        "ci95": {k: v["ci95"] for k, v in agg.items()},
        "seeds": per_seed,
    }


# ------------------------------------------------------------------------------------------------- comparing runs
def compare_runs(run_dirs: list[Path], metric: str = "ndcg@10", split: str = "test") -> str:
    """A Markdown table of several runs (mean ± CI) and a paired test of each against the first run, on ``split``
    (``test``, or ``valid`` for choices made on validation).

    The paired test uses per-row metric values averaged over each run's seeds, on the same rows."""
    from .evaluation.metrics import metrics_from_ranks, paired_test
    from .evaluation.report import MISSING, fmt_number, markdown_table

    name, _, k_text = metric.partition("@")
    known = sorted({m.split("@")[0] for m in metrics_from_ranks(np.zeros(1, np.int64), (10,))})
    if name not in known or not k_text.isdigit() or int(k_text) < 1:
        raise ConfigError(f"--metric '{metric}': expected one of {', '.join(f'{m}@K' for m in known)} with K >= 1 "
                          "(e.g. ndcg@10)")
    if split not in ("valid", "test"):
        raise ConfigError(f"--split '{split}': use valid or test")
    k = int(k_text)
    folders = [RunFolder(Path(d)) for d in run_dirs]
    runs = [f.read_metrics() for f in folders]
    for f, r in zip(folders, runs):
        if metric not in r[split] or f"hr@{k}" not in r[split]:
            raise ConfigError(f"--metric '{metric}': '{f.root}' reports {sorted(r[split])}; pick one of those cutoffs")
    rows = []
    base_dir, base = folders[0], runs[0]
    for f, r in zip(folders, runs):
        seeds = [s["seed"] for s in r["seeds"]]
        ci = r.get(f"{split}_ci95", {})
        row = [f.root.name, r["model"], len(seeds), fmt_number(r[split][f"hr@{k}"], ci=ci.get(f"hr@{k}")),
               fmt_number(r[split][metric], ci=ci.get(metric))]
        if f is base_dir:
            rows.append(row + [MISSING] * 3)
            continue
        if r["protocol"]["hash"] != base["protocol"]["hash"]:
            rows.append(row + ["protocols differ", MISSING, MISSING])
            continue
        base_seeds = [s["seed"] for s in base["seeds"]]
        a = np.mean([metrics_from_ranks(f.read_ranks(split, s), (k,))[metric] for s in seeds], axis=0)
        b = np.mean([metrics_from_ranks(base_dir.read_ranks(split, s), (k,))[metric] for s in base_seeds], axis=0)
        t = paired_test(a, b, metric)
        rows.append(row + [f"{t.mean_diff:+.4f}", f"{t.t_pvalue:.3g}", f"{t.wilcoxon_pvalue:.3g}"])
    header = ["run", "model", "seeds", f"{split} hr@{k}", f"{split} {metric}", "Δ vs first", "paired t p",
              "Wilcoxon p"]
    return markdown_table(header, rows) + "\n"
