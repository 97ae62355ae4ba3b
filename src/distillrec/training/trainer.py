"""The shared trainer: one loop for every recommender, top to bottom.

For each seed: build the model, ``fit`` it on the training sequences, then (if it has parameters) train epoch by
epoch, evaluating full-ranking NDCG@10 on validation after each epoch; keep the best-validation weights, stop after
``patience`` epochs without improvement, and test the best-validation weights once. Test is never looked at before.

Determinism and resume: each epoch's shuffling and dropout are seeded from (seed, epoch), and a checkpoint with
model, optimizer and loop state is written atomically at the end of every epoch, so ``resume=True`` after a kill
continues from the last finished epoch and ends with the same metrics as an uninterrupted run.
Under ``torchrun --nproc_per_node N`` the same code runs DDP: each rank trains on its shard of every epoch's
batches and evaluates a stripe of the rows, and rank 0 writes everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.batching import causal_batch, causal_windows, example_batch, length_bucketed_batches
from ..data.dataset import Dataset
from ..data.loaders import load_dataset
from ..config import auto_threads_reason
from ..errors import ConfigError
from ..evaluation.evaluator import rank_examples, rank_valid_and_test, summarise
from ..evaluation.metrics import aggregate_seeds
from ..evaluation.report import plot_curves, render_run_report
from ..files import atomic_write_text, folder_lock, prepare_out
from ..resources import PhasePeaks, peak_rss_mb
from ..models import Recommender, build_model
from ..runs import RunConfig, RunFolder, check_feature_names, dump_config, evaluate_run, load_run_dataset
from .checkpoint import load_checkpoint, read_state, save_checkpoint
from .distributed import barrier, gather_rows, init_distributed, shard
from .teacher import TeacherHook


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)


def _make_logger(out_dir: Path, rank: int) -> logging.Logger:
    logger = logging.getLogger(f"distillrec.run.{out_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):  # a handler of an earlier run in this process may hold a deleted file
        logger.removeHandler(h)
        h.close()
    if rank == 0:
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(fh)
    return logger


class _RankedEval:
    """Evaluates a split under DDP striping: each rank ranks rows[rank::world], every rank gets all ranks."""

    def __init__(self, cfg: RunConfig, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world

    def ranks(self, model: Recommender, examples) -> np.ndarray:
        rows = np.arange(len(examples))[self.rank :: self.world]
        mine = rank_examples(model, examples, self.cfg.eval, self.cfg.train.max_len, rows=rows)
        return gather_rows(mine, len(examples), self.rank, self.world)

    def valid_and_test_ranks(self, model: Recommender, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(len(dataset.valid))[self.rank :: self.world]
        v, t = rank_valid_and_test(model, dataset.valid, dataset.test, self.cfg.eval, self.cfg.train.max_len, rows)
        n = len(dataset.valid)
        return gather_rows(v, n, self.rank, self.world), gather_rows(t, len(dataset.test), self.rank, self.world)


def train_one_seed(
    cfg: RunConfig, dataset: Dataset, seed: int, out_dir: Path, resume: bool, logger: logging.Logger,
    peaks: PhasePeaks | None = None,
) -> dict[str, Any]:
    rank, world = init_distributed()
    folder = RunFolder(out_dir)
    evaluator = _RankedEval(cfg, rank, world)
    select = cfg.eval.select_metric
    peaks = peaks or PhasePeaks()
    with peaks.phase("train"):
        model, history, best_epoch, t_train, t_eval = _train(cfg, dataset, seed, out_dir, resume, logger, evaluator)
    with peaks.phase("evaluate"):
        t1 = time.perf_counter()
        if len(dataset.valid) == len(dataset.test):
            valid_ranks, test_ranks = evaluator.valid_and_test_ranks(model, dataset)
        else:
            valid_ranks, test_ranks = evaluator.ranks(model, dataset.valid), evaluator.ranks(model, dataset.test)
        t_eval += time.perf_counter() - t1
    valid = summarise(valid_ranks, dataset.valid, dataset, cfg.eval, with_slices=False)
    test = summarise(test_ranks, dataset.test, dataset, cfg.eval)
    if rank == 0:
        folder.ranks_dir.mkdir(exist_ok=True)
        np.save(folder.ranks("valid", seed), valid_ranks)
        np.save(folder.ranks("test", seed), test_ranks)
    logger.info(f"seed {seed}: best epoch {best_epoch + 1}, valid {select} {valid['metrics'][select]:.4f}, "
                f"test {select} {test['metrics'][select]:.4f}")
    return {
        "seed": seed,
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history),
        "valid": valid["metrics"],
        "test": test["metrics"],
        "slices": test["slices"],
        "history": history,
        "train_s": round(t_train, 3),
        "eval_s": round(t_eval, 3),
    }


def _train(cfg: RunConfig, dataset: Dataset, seed: int, out_dir: Path, resume: bool, logger: logging.Logger,
           evaluator: _RankedEval) -> tuple[Recommender, list[dict[str, Any]], int, float, float]:
    """Build, fit and train one seed (best-validation weights loaded); returns (model, history, best epoch index,
    train seconds, validation seconds)."""
    rank, world = init_distributed()
    tc = cfg.train
    folder = RunFolder(out_dir)
    last_path, best_path = folder.checkpoint(seed, "last"), folder.checkpoint(seed, "best")
    select = cfg.eval.select_metric
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    model = build_model(cfg.model.name, cfg.model.params, dataset)
    model.fit(dataset)
    t_train = 0.0
    t_eval = 0.0
    history: list[dict[str, Any]] = []
    best_epoch = -1

    if model.trainable:
        ddp = (
            torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
        )  # buffers (feature matrices, statistics) never change in training: no need to broadcast them
        optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay
        )
        state = {"epoch_done": -1, "best": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": [], "finished": False}
        if resume and last_path.exists():
            state = load_checkpoint(last_path, model, optimizer)
            logger.info(f"seed {seed}: resumed after epoch {state['epoch_done']}")
        history = state["history"]
        t_train, t_eval = state.get("train_s", 0.0), state.get("eval_s", 0.0)  # a resumed run keeps its time

        if model.train_format == "causal":
            units = causal_windows(dataset.train, tc.max_len)
            unit_lengths = np.array([len(w[0]) for w in units])
            make_batch = causal_batch
        else:
            train_examples = dataset.train_examples()
            units = np.arange(len(train_examples))
            unit_lengths = np.array([min(len(h), tc.max_len) for h in train_examples.histories])
            make_batch = None
        # knowledge distillation from cached teacher logits (train.teacher; training.teacher): off by default, and
        # weight 0 skips it, so a plain run's numbers do not depend on this hook
        hook = None
        if tc.teacher is not None:
            if world > 1:
                raise ConfigError("train.teacher: distillation runs in one process; run without torchrun")
            hook = TeacherHook(tc.teacher, dataset, model.train_format, units, tc.max_len)
            logger.info(f"seed {seed}: teacher {json.dumps(hook.describe())}")
            if tc.teacher.weight == 0:
                hook = None
        per_rank_batch = max(1, tc.batch_size // world)
        epoch = state["epoch_done"] + 1
        while not state["finished"] and epoch < tc.epochs:
            t0 = time.perf_counter()
            torch.manual_seed(_epoch_seed(seed, epoch))
            rng = np.random.default_rng(_epoch_seed(seed, epoch))
            order = shard(rng.permutation(len(units)), rank, world)
            if tc.bucket_by_length:
                batches = length_bucketed_batches(order, unit_lengths, per_rank_batch, rng)
            else:
                batches = [order[i : i + per_rank_batch] for i in range(0, len(order), per_rank_batch)]
            model.train()
            total, kd_total, n_batches = 0.0, 0.0, len(batches)
            bar = tqdm(
                range(n_batches), desc=f"seed {seed} epoch {epoch + 1}/{tc.epochs}", leave=False,
                disable=not tc.progress or rank != 0, dynamic_ncols=True, mininterval=1.0,
            )
            for b in bar:
                idx = batches[b]
                if make_batch is not None:
                    batch = make_batch([units[i] for i in idx])
                else:
                    batch = example_batch(train_examples, idx, tc.max_len)
                loss = ddp(batch)
                if hook is not None:
                    kd = hook.loss(model, idx)
                    if kd is not None:
                        loss = loss + kd
                        kd_total += float(kd.detach())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                total += float(loss.detach())
                bar.set_postfix(loss=f"{total / (b + 1):.4f}")
            bar.close()
            t_train += time.perf_counter() - t0

            t1 = time.perf_counter()
            valid_ranks = evaluator.ranks(model, dataset.valid)
            valid = summarise(valid_ranks, dataset.valid, dataset, cfg.eval, with_slices=False)["metrics"]
            t_eval += time.perf_counter() - t1
            score = valid[select]
            improved = score > state["best"]
            if improved:
                state.update(best=score, best_epoch=epoch, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            history.append(
                {"epoch": epoch + 1, "train_loss": total / max(1, n_batches), f"valid_{select}": score,
                 "epoch_s": round(time.perf_counter() - t0, 3)}
            )
            if hook is not None:  # the KD term's share of train_loss
                history[-1]["train_kd"] = kd_total / max(1, n_batches)
            state["history"] = history
            state["epoch_done"] = epoch
            state["train_s"], state["eval_s"] = t_train, t_eval
            state["finished"] = state["bad_epochs"] >= tc.patience or epoch + 1 >= tc.epochs
            if rank == 0:
                if improved:
                    save_checkpoint(best_path, model, {"epoch": epoch, select: score})
                save_checkpoint(last_path, model, state, optimizer)
            barrier()
            eta = (tc.epochs - epoch - 1) * (time.perf_counter() - t0)
            logger.info(
                f"seed {seed} epoch {epoch + 1}: loss {history[-1]['train_loss']:.4f} valid {select} {score:.4f}"
                f"{' (best)' if improved else ''} [{history[-1]['epoch_s']:.1f}s, at most {eta:.0f}s left]"
            )
            epoch += 1
        best_epoch = state["best_epoch"]
        if best_path.exists():
            load_checkpoint(best_path, model)
    return model, history, best_epoch, t_train, t_eval


def _mean_slices(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    first = per_seed[0]["slices"]
    out: dict[str, Any] = {}
    for group, buckets in first.items():
        out[group] = {}
        for label, metrics in buckets.items():
            out[group][label] = {
                k: float(np.mean([s["slices"][group][label].get(k, 0.0) for s in per_seed])) for k in metrics
            }
            out[group][label]["n"] = metrics["n"]
    return out


def prepare_run_folder(cfg: RunConfig, out_dir: Path, *, resume: bool) -> RunFolder:
    """Create the run folder, or check an existing one: resuming needs the same config (a different one is refused
    with the differing keys named, before anything is overwritten); without ``resume``, only what ``train`` writes is
    removed, and only from a folder that is a run folder. Call it holding the folder's lock (``files.folder_lock``)."""
    folder = RunFolder(out_dir)
    if folder.root.exists() and not folder.root.is_dir():
        raise ConfigError(f"out '{folder.root}' is a file; give a folder")
    if resume and folder.config.is_file():
        diff = _changed_keys(yaml_load(folder.config), cfg.model_dump(mode="json"))
        if diff:
            raise ConfigError(f"'{folder.root}' holds a run of another config (differs in {', '.join(diff)}); "
                              "use another --out, or --restart to replace it")
    prepare_out(folder.root, [p.name for p in folder.outputs()], restart=not resume, marker=folder.config.name)
    return folder


def finished_metrics(cfg: RunConfig, out_dir: Path) -> dict[str, Any] | None:
    """The metrics of a finished run of ``cfg`` in ``out_dir`` (its ``metrics.json``, config unchanged up to the
    runtime settings), else None: a finished run is reused as it is, nothing retrained, re-evaluated or logged."""
    folder = RunFolder(out_dir)
    if not (folder.metrics.is_file() and folder.config.is_file()):
        return None
    if _changed_keys(yaml_load(folder.config), cfg.model_dump(mode="json")):
        return None
    try:
        metrics = json.loads(folder.metrics.read_text())
    except (OSError, ValueError):
        return None
    done = {s.get("seed") for s in metrics.get("seeds", [])}
    return metrics if done == set(cfg.train.seeds) else None


def yaml_load(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (runtime settings, which change no result, are ignored)."""
    from ..config import RUNTIME_KEYS

    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            if prefix == "train." and k in RUNTIME_KEYS:
                continue
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def run(
    cfg: RunConfig, out_dir: str | Path, resume: bool = True, dataset: Dataset | None = None
) -> dict[str, Any]:
    """Train and evaluate ``cfg`` for every seed; writes config.yaml, metrics.json, report.md, train.log and
    checkpoints into ``out_dir`` and returns the metrics dictionary. ``resume`` (the default): a folder holding a run
    of the same config continues from its last checkpoints (finished seeds are reused; a finished run is returned as
    it is, nothing retrained, re-evaluated or appended to ``train.log``); ``resume=False`` starts over. The dataset
    and the features the model names are checked before the folder is touched, and the folder is locked while the
    run writes it (another process writing the same folder is refused, naming its pid). Item features with all-zero
    rows (e.g. files that are not images) are warned about in ``train.log``, ``metrics.json`` and ``report.md``."""
    rank, world = init_distributed()
    out_dir = Path(out_dir)
    cfg.train.apply()
    dataset = dataset if dataset is not None else load_dataset(cfg.dataset)
    check_feature_names(cfg, dataset)
    if not (len(dataset.valid) and len(dataset.test)):
        raise ConfigError(f"dataset '{dataset.name}' has {len(dataset.valid)} validation and {len(dataset.test)} test "
                          "rows: nothing to select or test on (see `distillrec data inspect`)")
    # rank 0 writes the folder and holds its lock for the whole run: a second writer is refused
    with folder_lock(out_dir) if rank == 0 else contextlib.nullcontext():
        folder = prepare_run_folder(cfg, out_dir, resume=resume) if rank == 0 else RunFolder(out_dir)
        barrier()
        reused = finished_metrics(cfg, out_dir) if resume else None
        if reused is not None:
            return reused
        return _run_in_folder(cfg, folder, dataset, resume, rank, world)


def _feature_warnings(cfg: RunConfig, dataset: Dataset) -> list[str]:
    """The model's item features with all-zero rows (a missing or unreadable image, an item without the feature):
    the model sees no content for those items, which belongs in the run's log and report, not only on stderr."""
    out = []
    for name in cfg.feature_names():
        mat = dataset.items.features.get(name)
        if mat is None:
            continue
        zero = np.flatnonzero(~np.asarray(mat[1:]).any(axis=1))
        if len(zero):
            examples = ", ".join(dataset.items.ids[i] for i in zero[:5])
            what = ("their image file is missing or not an image" if name.startswith("image_")
                    else "the items have no value")
            out.append(f"feature '{name}': {len(zero)} of {dataset.n_items} items have an all-zero row ({what}; "
                       f"e.g. items {examples}): the model sees no content for them")
    return out


def _run_in_folder(cfg: RunConfig, folder: RunFolder, dataset: Dataset, resume: bool, rank: int,
                   world: int) -> dict[str, Any]:
    out_dir = folder.root
    logger = _make_logger(out_dir, rank)
    if rank == 0:
        atomic_write_text(folder.config, dump_config(cfg))
    features_log = logging.getLogger("distillrec.features")  # the encoders' warnings (unreadable images) go here too
    handlers: list[logging.Handler] = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if handlers and not logging.getLogger().handlers:  # keep them on stderr as well (Python's last resort)
        handlers.append(logging.StreamHandler())
    for h in handlers:
        features_log.addHandler(h)
    peaks = PhasePeaks()
    try:
        with peaks.phase("load"):
            dataset = load_run_dataset(cfg, dataset)
    finally:
        for h in handlers:
            features_log.removeHandler(h)
    protocol = cfg.eval.describe(dataset, cfg.train.max_len)
    logger.info(f"model {cfg.model.name} on {dataset.name}: {json.dumps(dataset.statistics())}")
    logger.info(f"protocol {protocol['hash']}: {json.dumps(protocol)}")
    logger.info(f"loader report: {dataset.report.summary()}")
    logger.info(f"torch threads {torch.get_num_threads()} ({auto_threads_reason()}); OpenMP wait policy "
                f"{os.environ.get('OMP_WAIT_POLICY', 'default')}")
    warnings = _feature_warnings(cfg, dataset)
    for w in warnings:
        logger.warning(f"warning: {w}")
        if rank == 0:
            print(f"warning: {w}", file=sys.stderr)

    per_seed = [train_one_seed(cfg, dataset, s, out_dir, resume, logger, peaks) for s in cfg.train.seeds]
    valid_agg = aggregate_seeds([s["valid"] for s in per_seed])
    test_agg = aggregate_seeds([s["test"] for s in per_seed])
    metrics = {
        "model": cfg.model.name,
        "dataset": dataset.name,
        "dataset_stats": dataset.statistics(),
        "protocol": protocol,
        "valid": {k: v["mean"] for k, v in valid_agg.items()},
        "test": {k: v["mean"] for k, v in test_agg.items()},
        "valid_ci95": {k: v["ci95"] for k, v in valid_agg.items()},
        "test_ci95": {k: v["ci95"] for k, v in test_agg.items()},
        "slices": _mean_slices(per_seed),
        "seeds": per_seed,
        "timing": {
            "train_s": round(sum(s["train_s"] for s in per_seed), 3),
            "eval_s": round(sum(s["eval_s"] for s in per_seed), 3),
            "train_s_per_epoch": round(
                sum(s["train_s"] for s in per_seed) / max(1, sum(s["epochs_run"] for s in per_seed)), 3
            ),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_mb_by_phase": peaks.as_dict(),
            "world_size": world,
        },
        "warnings": warnings,
    }
    if rank == 0:
        atomic_write_text(folder.metrics, json.dumps(metrics, indent=1))
        curves = plot_curves(per_seed, folder.curves)
        report = render_run_report(metrics, curves_png=curves)
        if warnings:
            report = report.rstrip("\n") + "\n\n## Warnings\n\n" + "".join(f"- {w}\n" for w in warnings)
        atomic_write_text(folder.report, report)
    barrier()
    return metrics


__all__ = ["run", "evaluate_run", "prepare_run_folder", "read_state", "peak_rss_mb"]
