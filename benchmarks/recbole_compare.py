"""Benchmark: our SASRec / GRU4Rec against RecBole 1.2.1 on the same split and hyperparameters.

For each dataset and model, both sides train in their own subprocess (so each peak RSS is that side's alone) with
the same epoch cap, early-stopping patience, torch thread count, Adam lr 1e-3, history length 50, CE over all items,
full ranking with history not masked, and best-valid-NDCG@10 selection; the test metrics are those of the best
validation epoch. Prints one table (and writes ``<out>.json`` and ``<out>.md``)::

    python benchmarks/recbole_compare.py                                   # all datasets and models
    python benchmarks/recbole_compare.py --datasets ml-100k --epochs 1     # smoke test

Splits. ml-100k: RecBole reads its bundled copy; we read the same file with the ``recbole_inter`` loader, which
orders and splits it exactly as RecBole does (tests/test_recbole_inter.py checks all 943 users against RecBole's own
export). Amazon datasets: our Dataset is exported to a RecBole ``.inter`` whose timestamps are sequence positions,
so RecBole's ``LS: valid_and_test`` + ``order: TO`` reproduces our leave-one-out. Either way, the driver writes
RecBole's per-user valid/test items and this script compares them with ours (``split_match`` in the output).

Batches. RecBole's training rows are prefixes (one target each, history <= 50), batch 2048 rows. Ours are windows of
<= 50 positions trained causally (every position is a target), so one of our rows holds many targets. By default
(``--our-batch matched``) our batch size is chosen so both sides take the same number of optimiser steps per epoch,
i.e. about 2048 targets per step on both sides: ``ceil(our windows / ceil(RecBole rows / 2048))``.

The RecBole venv (``benchmarks/_work/recbole-venv``) is created when missing, with the pins in ``PINS``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
VENV = WORK / "recbole-venv"
DRIVER = HERE / "recbole_driver.py"

PINS = {
    "step1": ["torch==2.13.0"],
    "step2": ["recbole==1.2.1", "setuptools<81", "numpy<2", "pandas<3"],
    "env": {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    "why": "setuptools<81: ray 2.6.3 imports pkg_resources; numpy<2 + pandas<3: ray's np.bool8; "
           "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: torch>=2.6 cannot reload RecBole checkpoints otherwise",
}
DATASETS = ["ml-100k", "amazon2018-scientific-text", "amazon2014-beauty"]
MODELS = {"sasrec": "SASRec", "gru4rec": "GRU4Rec"}
RECBOLE_BATCH = 2048
MAX_LEN = 50
SEED = 2020

# the shared protocol (= shared/reference/recbole-ml100k/protocol_seq_ml100k.yaml, minus the per-run keys)
RECBOLE_PROTOCOL: dict[str, Any] = {
    "use_gpu": False, "gpu_id": "", "seed": SEED, "reproducibility": True, "state": "INFO",
    "show_progress": False, "log_wandb": False, "worker": 0,
    "rm_dup_inter": None, "val_interval": None, "user_inter_num_interval": None, "item_inter_num_interval": None,
    "MAX_ITEM_LIST_LENGTH": MAX_LEN,
    "learner": "adam", "learning_rate": 1e-3, "weight_decay": 0.0, "train_batch_size": RECBOLE_BATCH,
    "train_neg_sample_args": None, "eval_step": 1, "clip_grad_norm": None,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    "repeatable": True, "metrics": ["Recall", "Hit", "NDCG", "MRR"], "topk": [5, 10, 20],
    "valid_metric": "NDCG@10", "eval_batch_size": 4096, "metric_decimal_place": 4,
}
# RecBole's model defaults (recbole/properties/model/*.yaml), restated; ours are the same values
RECBOLE_MODEL = {
    "SASRec": {"n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256, "hidden_dropout_prob": 0.5,
               "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
               "loss_type": "CE"},
    "GRU4Rec": {"embedding_size": 64, "hidden_size": 128, "num_layers": 1, "dropout_prob": 0.3, "loss_type": "CE"},
}
OUR_MODEL = {
    "sasrec": {"n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256, "hidden_dropout_prob": 0.5,
               "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
               "max_len": MAX_LEN, "loss_type": "CE"},
    "gru4rec": {"embedding_size": 64, "hidden_size": 128, "num_layers": 1, "dropout_prob": 0.3, "loss_type": "CE"},
}
TARGETS = {"quality": "ours >= RecBole within the 95% CI (diff >= -1.96 * sqrt(se_ours^2 + se_recbole^2))",
           "epoch_time": "ours / RecBole <= 1/3", "eval_time": "ours / RecBole <= 1/3",
           "peak_memory": "ours / RecBole <= 1/2"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- environment


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> dict[str, Any]:
    """Create the RecBole venv when it is missing or broken; returns the pins and the installed versions."""
    py = venv_python()
    check = [str(py), "-c", "import recbole"]
    env = dict(os.environ, **PINS["env"])
    ok = py.exists() and subprocess.run(check, env=env, capture_output=True).returncode == 0
    if not ok:
        log(f"creating the RecBole venv at {VENV} (a few minutes)")
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
        subprocess.run(pip + PINS["step1"], check=True)
        subprocess.run(pip + PINS["step2"], check=True)
        subprocess.run(check, env=env, check=True)
    code = ("import json, torch, numpy, pandas, recbole; print(json.dumps({'recbole': recbole.__version__, "
            "'torch': torch.__version__, 'numpy': numpy.__version__, 'pandas': pandas.__version__}))")
    out = subprocess.run([str(py), "-c", code], env=env, capture_output=True, text=True, check=True)
    versions = json.loads(out.stdout.strip().splitlines()[-1])
    return {"venv": str(VENV.relative_to(REPO)), "pins": PINS, "installed": versions}


def ml100k_folder() -> Path:
    found = sorted((VENV / "lib").glob("python3*/site-packages/recbole/dataset_example/ml-100k"))
    if not found or not (found[0] / "ml-100k.inter").is_file():
        raise SystemExit(f"ml-100k not found inside {VENV}; delete the venv and rerun to reinstall recbole")
    return found[0]


# ---------------------------------------------------------------------------------------------------- datasets


def our_dataset_spec(name: str) -> dict[str, Any]:
    if name == "ml-100k":
        return {"name": "ml-100k", "format": "recbole_inter", "path": str(ml100k_folder()),
                "options": {"stem": "ml-100k"}}
    return {"name": name}


def write_inter_fallback(ds, folder: Path, name: str) -> dict[str, Any]:
    """Used only when distillrec.data.export is unavailable: the leave-one-out sequences with position timestamps."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [" ".join(str(e).split()) for e in ds.items.ids]
    n = 0
    with open(folder / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for j, (u, seq) in enumerate(zip(ds.train_users, ds.train)):
            full = list(seq) + [int(ds.valid.targets[j]), int(ds.test.targets[j])]
            for pos, i in enumerate(full):
                f.write(f"{' '.join(str(u).split())}\t{ids[int(i) - 1]}\t{pos}\n")
                n += 1
    return {"inter": str(folder / f"{name}.inter"), "mode": "leave_one_out", "interactions": n}


def prepare_dataset(name: str) -> dict[str, Any]:
    """Load ours once (in this process) to export it for RecBole and to count training units; returns the info
    both sides need."""
    from distillrec.data.batching import causal_windows
    from distillrec.data.loaders import load_dataset

    ds = load_dataset(our_dataset_spec(name))
    info: dict[str, Any] = {
        "name": name, "our_spec": our_dataset_spec(name), "fingerprint": ds.fingerprint(),
        "users": len(ds.valid), "items": ds.n_items,
        "train_rows_prefix": int(sum(max(0, len(s) - 1) for s in ds.train)),
        "train_windows": len(causal_windows(ds.train, MAX_LEN)),
        "sequences": len(ds.train),
    }
    ext = ds.items.ids
    info["our_split"] = {str(u): (ext[int(v) - 1], ext[int(t) - 1])
                         for u, v, t in zip(ds.valid.users, ds.valid.targets, ds.test.targets)}
    if name == "ml-100k":
        info["recbole_dataset"] = "ml-100k"
        info["recbole_config"] = {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}}
        info["split_source"] = "both read recbole/dataset_example/ml-100k; ours orders it as RecBole does"
        return info
    data_root = WORK / "recbole_data"
    rb_name = name
    try:
        from distillrec.data.export import export_recbole

        exported = export_recbole(ds, data_root / rb_name, rb_name)
        how = "distillrec.data.export.export_recbole"
    except ImportError:
        exported = write_inter_fallback(ds, data_root / rb_name, rb_name)
        how = "recbole_compare.write_inter_fallback"
    if exported.get("mode") != "leave_one_out":
        raise SystemExit(f"{name}: not a per-user leave-one-out dataset; RecBole's LS split would differ")
    info["recbole_dataset"] = rb_name
    info["recbole_config"] = {"data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                              "normalize_all": False, "normalize_field": None}
    info["split_source"] = f"ours exported by {how} (timestamps = positions) -> {exported['inter']}"
    return info


def split_match(info: dict[str, Any], recbole_split: Path) -> dict[str, Any]:
    ours = info["our_split"]
    n = same = 0
    missing = 0
    for line in recbole_split.read_text().splitlines()[1:]:
        u, v, t = line.split("\t")
        n += 1
        if u not in ours:
            missing += 1
        elif ours[u] == (v, t):
            same += 1
    return {"users_recbole": n, "users_ours": len(ours), "identical_valid_and_test_items": same,
            "recbole_users_not_in_ours": missing, "ok": n == len(ours) == same}


# ---------------------------------------------------------------------------------------------------- our side


def our_worker(spec_path: str) -> None:
    """Runs in its own process: train with distillrec, time one valid+test pass with the best model."""
    spec = json.loads(Path(spec_path).read_text())
    t_start = time.perf_counter()
    import numpy as np
    import torch

    from distillrec.config import set_num_threads
    from distillrec.data.loaders import load_dataset
    from distillrec.evaluation.evaluator import rank_valid_and_test
    from distillrec.evaluation.metrics import metrics_from_ranks
    from distillrec.resources import gemm_peak_gflops, peak_rss_mb
    from distillrec.runs import RunFolder, load_config, load_trained
    from distillrec.training.trainer import run

    set_num_threads(spec["threads"])
    cfg = load_config(spec["config"])
    out_dir = Path(spec["out_dir"])
    dataset = load_dataset(cfg.dataset)
    metrics = run(cfg, out_dir, resume=False, dataset=dataset)  # timed from scratch, never resumed
    seed = cfg.train.seeds[0]
    s = metrics["seeds"][0]

    model = load_trained(out_dir, seed, dataset).model
    # the evaluation the trainer runs at the end (and `distillrec evaluate`): valid + test, full ranking
    evaluate = lambda: rank_valid_and_test(model, dataset.valid, dataset.test, cfg.eval, cfg.train.max_len)  # noqa: E731
    evaluate()  # warm-up, as RecBole's timed pass follows its own valid and test evaluations
    t0 = time.perf_counter()
    evaluate()
    eval_pass_s = time.perf_counter() - t0
    eval_flops = count_eval_flops(model, evaluate)
    peak = gemm_peak_gflops()

    ranks = RunFolder(out_dir).read_ranks("test", seed)
    per = metrics_from_ranks(ranks, (10,))
    n = len(ranks)
    n_units = spec["train_units"]
    out = {
        "model": cfg.model.name,
        "dataset": dataset.name,
        "threads": torch.get_num_threads(),
        "train_batch_size": cfg.train.batch_size,
        "train_units": n_units,
        "steps_per_epoch": math.ceil(n_units / cfg.train.batch_size),
        "epochs_run": s["epochs_run"],
        "best_epoch": s["best_epoch"],
        "best_valid_ndcg@10": s["valid"]["ndcg@10"],
        "valid_ndcg@10_per_epoch": [h["valid_ndcg@10"] for h in s["history"]],
        "epoch_s_incl_valid": [h["epoch_s"] for h in s["history"]],
        "train_s_per_epoch_mean": metrics["timing"]["train_s_per_epoch"],
        "train_s_total": metrics["timing"]["train_s"],
        "eval_s_total_incl_final": metrics["timing"]["eval_s"],
        "eval_pass_s": round(eval_pass_s, 3),
        "eval_gflop": round(eval_flops / 1e9, 2),
        "eval_gflops": round(eval_flops / 1e9 / eval_pass_s, 1),
        "gemm_peak_gflops": round(peak, 1),
        "eval_pct_of_peak": round(100 * eval_flops / 1e9 / eval_pass_s / peak, 1),
        "peak_rss_mb_by_phase": metrics["timing"].get("peak_rss_mb_by_phase"),
        "test": metrics["test"],
        "valid": metrics["valid"],
        "test_per_user": {
            "n": n,
            "ndcg@10_mean": float(per["ndcg@10"].mean()),
            "ndcg@10_se": float(per["ndcg@10"].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "hr@10_mean": float(per["hr@10"].mean()),
        },
        "protocol_hash": metrics["protocol"]["hash"],
        "dataset_fingerprint": metrics["protocol"]["dataset_fingerprint"],
        "wall_s": round(time.perf_counter() - t_start, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print("OURS_RESULT " + json.dumps(out), flush=True)


def count_eval_flops(model, evaluate) -> float:
    """Floating-point operations of one evaluation pass: torch's FLOP counter (matrix products, attention) plus the
    GRU recurrences it does not count (2 x 3 gates x (input + hidden) x hidden per position, padding included)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    gru_flops = [0.0]

    def count_gru(module, inputs, output):
        x = inputs[0]
        h = module.hidden_size
        per_position = 0.0
        for layer in range(module.num_layers):
            d_in = module.input_size if layer == 0 else h
            per_position += 2 * 3 * (d_in + h) * h
        gru_flops[0] += per_position * x.shape[0] * x.shape[1]

    hooks = [m.register_forward_hook(count_gru) for m in model.modules() if isinstance(m, torch.nn.GRU)]
    try:
        with FlopCounterMode(display=False) as counter:
            evaluate()
    finally:
        for h in hooks:
            h.remove()
    return float(counter.get_total_flops()) + gru_flops[0]


# ---------------------------------------------------------------------------------------------------- running


def _thread_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **PINS["env"])


def _run_child(cmd: list[str], marker: str, env: dict[str, str], cwd: Path, log_path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=lf, text=True)
        out, _ = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith(marker + " ")]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}); log {log_path}:\n{tail}")
    res = json.loads(lines[-1][len(marker) + 1:])
    res["process_wall_s"] = round(time.perf_counter() - t0, 3)
    # other processes on the machine distort every timing (threads wait on descheduled threads): keep the load
    res["loadavg_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    return res


def run_ours(info: dict[str, Any], model: str, args, batch: int, seed: int = SEED) -> dict[str, Any]:
    tag = f"{info['name']}_{model}_{seed}"
    out_dir = WORK / "ours_runs" / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    config = {
        "model": {"name": model, "params": OUR_MODEL[model] | ({"ce_chunk": args.ce_chunk} if args.ce_chunk else {})},
        "dataset": info["our_spec"],
        "train": {"epochs": args.epochs, "batch_size": batch, "lr": 1e-3, "weight_decay": 0.0,
                  "patience": args.patience, "max_len": MAX_LEN, "seeds": [seed], "num_threads": args.threads,
                  "progress": False, "bucket_by_length": not args.no_bucket},
        "eval": {"candidates": "full", "mask_history": False, "select_metric": "ndcg@10"},
    }
    spec = {"config": config, "out_dir": str(out_dir), "threads": args.threads, "train_units": info["train_windows"]}
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    res = _run_child([sys.executable, str(Path(__file__).resolve()), "--_ours-worker", str(spec_path)],
                     "OURS_RESULT", _thread_env(args.threads), REPO, out_dir / "worker.log")
    res["config"] = config
    return res


def run_recbole(info: dict[str, Any], model: str, args, seed: int = SEED) -> dict[str, Any]:
    rb_model = MODELS[model]
    tag = f"{info['name']}_{rb_model}_{seed}"
    run_dir = WORK / "recbole_runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = dict(RECBOLE_PROTOCOL) | RECBOLE_MODEL[rb_model] | info["recbole_config"] | {
        "epochs": args.epochs,
        "seed": seed,
        # RecBole stops after stopping_step + 1 non-improving validations, ours after `patience`
        "stopping_step": max(0, args.patience - 1),
        "checkpoint_dir": str(run_dir / "saved"),
    }
    spec = {"model": rb_model, "dataset": info["recbole_dataset"], "threads": args.threads, "config": config,
            "split_out": str(run_dir / "recbole_split.tsv")}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    res = _run_child([str(venv_python()), str(DRIVER), str(spec_path)], "RECBOLE_RESULT",
                     _thread_env(args.threads), run_dir, run_dir / "driver.log")
    res["config"] = config
    res["split_match"] = split_match(info, run_dir / "recbole_split.tsv")
    shutil.rmtree(run_dir / "saved", ignore_errors=True)  # checkpoints: large and not needed afterwards
    return res


def cached(side: str, info: dict[str, Any], model: str, args, seed: int, batch: int, fn) -> dict[str, Any]:
    """One side's result, kept in ``_work/results`` under a key of everything that changes it: a rerun after a kill
    reuses the finished sides (``--fresh`` ignores them)."""
    ours = side == "ours"  # our batch size, chunked CE and batch order change our side only
    key = {"side": side, "dataset": info["name"], "fingerprint": info["fingerprint"], "model": model, "seed": seed,
           "epochs": args.epochs, "patience": args.patience, "threads": args.threads, "batch": batch if ours else None,
           "ce_chunk": args.ce_chunk if ours else None, "bucket": not args.no_bucket if ours else None,
           # our side changes with our code: its results are reused only at the same commit
           "commit": _commit() if ours else None}
    path = WORK / "results" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if path.is_file() and not args.fresh:
        log(f"  {side}: reusing {path.name}")
        res = json.loads(path.read_text())
        res.setdefault("computed_at", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)))
        return res
    res = fn()
    res["computed_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_to(target: float, valid: list[float], epoch_s: list[float]) -> tuple[float | None, int | None]:
    """Cumulative seconds (training + validation) until the first epoch whose valid NDCG@10 reaches ``target``."""
    total = 0.0
    for e, (v, t) in enumerate(zip(valid, epoch_s), 1):
        total += t
        if v >= target - 1e-12:
            return total, e
    return None, None


def time_to_quality_table(pairs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Per (dataset, model): RecBole's best valid NDCG@10 (the target), each side's wall time to first reach it, and
    the final test metrics (mean ± 95% CI over seeds; with one seed ± 1.96 per-user standard errors)."""
    from distillrec.evaluation.metrics import mean_ci
    from distillrec.evaluation.report import fmt_number, markdown_table

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in pairs:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    rows, out = [], []
    for (ds, model), runs in groups.items():
        per_seed = []
        for r in runs:
            o, b = r["ours"], r["recbole"]
            target = max(b["valid_ndcg@10_per_epoch"])
            t_o, e_o = time_to(target, o["valid_ndcg@10_per_epoch"], o["epoch_s_incl_valid"])
            rb_epoch = [a + v for a, v in zip(b["train_s_per_epoch"], b["valid_s_per_epoch"])]
            t_b, e_b = time_to(target, b["valid_ndcg@10_per_epoch"], rb_epoch)
            per_seed.append({"seed": r["seed"], "target": target, "ours_s": t_o, "ours_epoch": e_o, "recbole_s": t_b,
                             "recbole_epoch": e_b, "ours_best_valid": max(o["valid_ndcg@10_per_epoch"]),
                             "ours_test": o["test"]["ndcg@10"], "recbole_test": b["test"]["ndcg@10"],
                             "ours_se": o["test_per_user"]["ndcg@10_se"], "recbole_se": b["test_per_user"]["ndcg@10_se"],
                             "ours_epochs": o["epochs_run"], "recbole_epochs": b["epochs_run"]})

        def ci(key: str, se_key: str) -> str:
            vals = [x[key] for x in per_seed]
            if len(vals) == 1:
                return f"{fmt_number(vals[0])} ± {fmt_number(1.96 * per_seed[0][se_key])}"
            c = mean_ci(vals)
            return f"{fmt_number(c['mean'])} ± {fmt_number(c['ci95'])}"

        def secs(key: str, ep_key: str) -> str:
            return "; ".join("not reached" if x[key] is None else f"{x[key]:.0f} s (epoch {x[ep_key]})"
                             for x in per_seed)

        ratio = [x["ours_s"] / x["recbole_s"] for x in per_seed if x["ours_s"] is not None and x["recbole_s"]]
        rows.append([ds, model, str(len(per_seed)), "; ".join(fmt_number(x["target"]) for x in per_seed),
                     secs("ours_s", "ours_epoch"), secs("recbole_s", "recbole_epoch"),
                     fmt_number(float(np.mean(ratio)), 3) if ratio else "–",
                     "; ".join(f"{x['ours_epochs']} / {x['recbole_epochs']}" for x in per_seed),
                     ci("ours_test", "ours_se"), ci("recbole_test", "recbole_se")])
        out.append({"dataset": ds, "model": model, "seeds": per_seed})
    head = ["dataset", "model", "seeds", "target: RecBole's best valid NDCG@10", "ours: time to target",
            "RecBole: time to target", "time ratio", "epochs run ours / RecBole", "test NDCG@10 ours",
            "test NDCG@10 RecBole"]
    return markdown_table(head, rows), out


# ---------------------------------------------------------------------------------------------------- reporting


def _se_hr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def summarise_pair(ds: str, model: str, ours: dict[str, Any], rb: dict[str, Any]) -> dict[str, Any]:
    n_o, n_r = ours["test_per_user"]["n"], rb["test_per_user"]["n"]
    o_ndcg, r_ndcg = ours["test"]["ndcg@10"], rb["test"]["ndcg@10"]
    o_hr, r_hr = ours["test"]["hr@10"], rb["test"]["hit@10"]
    q = {
        "ndcg@10": {"ours": o_ndcg, "recbole": r_ndcg, "se_ours": ours["test_per_user"]["ndcg@10_se"],
                    "se_recbole": rb["test_per_user"]["ndcg@10_se"]},
        "hr@10": {"ours": o_hr, "recbole": r_hr, "se_ours": _se_hr(o_hr, n_o), "se_recbole": _se_hr(r_hr, n_r)},
    }
    for m in q.values():
        m["ratio"] = _ratio(m["ours"], m["recbole"])
        m["diff"] = m["ours"] - m["recbole"]
        m["se_diff"] = math.sqrt(m["se_ours"] ** 2 + m["se_recbole"] ** 2)
        m["ok"] = bool(m["diff"] >= -1.96 * m["se_diff"])
    rb_epoch = sum(rb["train_s_per_epoch"]) / max(1, len(rb["train_s_per_epoch"]))
    cost = {
        "epoch_s": {"ours": ours["train_s_per_epoch_mean"], "recbole": round(rb_epoch, 3)},
        "eval_s": {"ours": ours["eval_pass_s"], "recbole": rb["eval_pass_s"]},
        "peak_rss_mb": {"ours": ours["peak_rss_mb"], "recbole": rb["peak_rss_mb"]},
    }
    limits = {"epoch_s": 1 / 3, "eval_s": 1 / 3, "peak_rss_mb": 1 / 2}
    for k, c in cost.items():
        c["ratio"] = _ratio(c["ours"], c["recbole"])
        c["target"] = limits[k]
        c["ok"] = c["ratio"] is not None and c["ratio"] <= limits[k]
    return {"dataset": ds, "model": model, "quality": q, "cost": cost,
            "epochs": {"ours": ours["epochs_run"], "recbole": rb["epochs_run"]},
            "best_epoch": {"ours": ours["best_epoch"], "recbole": rb["best_epoch"]},
            "steps_per_epoch": {"ours": ours["steps_per_epoch"], "recbole": rb["steps_per_epoch"]},
            "batch": {"ours": f"{ours['train_batch_size']} windows", "recbole": f"{rb['train_batch_size']} rows"},
            "split_match": rb["split_match"], "eval_gflops": ours.get("eval_gflops"),
            "eval_pct_of_peak": ours.get("eval_pct_of_peak"), "gemm_peak_gflops": ours.get("gemm_peak_gflops"),
            "rss_by_phase": ours.get("peak_rss_mb_by_phase")}


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def render_table(rows: list[dict[str, Any]]) -> str:
    from distillrec.evaluation.report import fmt_number, markdown_table

    head = ["dataset", "model", "ours NDCG@10 ± se", "RecBole NDCG@10 ± se", "NDCG ratio (≥1 in CI)",
            "ours HR@10 ± se", "RecBole HR@10 ± se", "HR ratio (≥1 in CI)",
            "s/epoch ours", "s/epoch RecBole", "ratio (≤0.33)", "eval s ours", "eval s RecBole", "ratio (≤0.33)",
            "eval GFLOP/s ours (% of GEMM peak)", "RSS MB ours", "RSS MB RecBole", "ratio (≤0.5)",
            "ours RSS MB load / train / eval", "epochs (best) ours / RecBole", "steps/epoch", "split"]
    table = []
    for r in rows:
        q, c = r["quality"], r["cost"]
        nd, hr = q["ndcg@10"], q["hr@10"]
        cells = [
            r["dataset"], r["model"],
            f"{fmt_number(nd['ours'])} ± {fmt_number(nd['se_ours'])}",
            f"{fmt_number(nd['recbole'])} ± {fmt_number(nd['se_recbole'])}",
            f"{fmt_number(nd['ratio'], 2)} {_mark(nd['ok'])}",
            f"{fmt_number(hr['ours'])} ± {fmt_number(hr['se_ours'])}",
            f"{fmt_number(hr['recbole'])} ± {fmt_number(hr['se_recbole'])}",
            f"{fmt_number(hr['ratio'], 2)} {_mark(hr['ok'])}",
            fmt_number(c["epoch_s"]["ours"], 2), fmt_number(c["epoch_s"]["recbole"], 1),
            f"{fmt_number(c['epoch_s']['ratio'], 3)} {_mark(c['epoch_s']['ok'])}",
            fmt_number(c["eval_s"]["ours"], 2), fmt_number(c["eval_s"]["recbole"], 2),
            f"{fmt_number(c['eval_s']['ratio'], 2)} {_mark(c['eval_s']['ok'])}",
            f"{fmt_number(r['eval_gflops'], 1)} ({fmt_number(r['eval_pct_of_peak'], 0)}% of "
            f"{fmt_number(r['gemm_peak_gflops'], 0)})",
            fmt_number(c["peak_rss_mb"]["ours"], 0), fmt_number(c["peak_rss_mb"]["recbole"], 0),
            f"{fmt_number(c['peak_rss_mb']['ratio'], 2)} {_mark(c['peak_rss_mb']['ok'])}",
            " / ".join(fmt_number((r["rss_by_phase"] or {}).get(k), 0) for k in ("load", "train", "evaluate")),
            f"{r['epochs']['ours']} ({r['best_epoch']['ours']}) / "
            f"{r['epochs']['recbole']} ({r['best_epoch']['recbole']})",
            f"{r['steps_per_epoch']['ours']} / {r['steps_per_epoch']['recbole']}",
            "same" if r["split_match"]["ok"] else
            f"DIFFERS ({r['split_match']['identical_valid_and_test_items']}/{r['split_match']['users_recbole']})",
        ]
        table.append(cells)
    return markdown_table(head, table)


def render_notes(result: dict[str, Any]) -> str:
    a = result["args"]
    batches = "; ".join(f"{d}: ours {b} windows" for d, b in result["our_batch"].items())
    env = result["environment"]
    return "\n".join([
        f"- Runs: seed {SEED}, epochs ≤ {a['epochs']} on both sides, early stopping after {a['patience']} "
        f"non-improving validations (RecBole stopping_step={max(0, a['patience'] - 1)}), {a['threads']} torch "
        f"thread(s) per side, each side in its own process. Test = best-valid-NDCG@10 epoch.",
        f"- Batches: RecBole {RECBOLE_BATCH} prefix rows (one target each, history ≤ {MAX_LEN}); ours = windows of "
        f"≤ {MAX_LEN} positions trained causally (every position a target). Our batch ({a['our_batch']}): "
        f"{batches} — 'matched' gives both sides the same optimiser steps per epoch (≈ {RECBOLE_BATCH} targets per "
        "step each), so equal epochs mean equal updates. Our trainer's defaults otherwise; batches "
        f"{'in shuffled order' if a.get('no_bucket') else 'length-bucketed (train.bucket_by_length=true)'}.",
        "- Same hyperparameters: RecBole defaults (SASRec 2 layers, 2 heads, hidden 64, inner 256, dropout 0.5/0.5, "
        "GELU; GRU4Rec emb 64, hidden 128, 1 layer, dropout 0.3), CE over all items, Adam 1e-3, wd 0, history ≤ 50, "
        "full ranking, history not masked. Eval batch: ours 512 rows, RecBole 4096 (each library's default).",
        "- Quality: mean over test users ± standard error (HR: sqrt(p(1-p)/n); NDCG: std/sqrt(n) of per-user NDCG@10 "
        "— RecBole's from its own top-k hits). 'ok' = ours ≥ RecBole − 1.96·sqrt(se_ours² + se_RecBole²).",
        "- s/epoch: training only (no validation). eval s: one full-ranking pass over valid + test with the best "
        "model (checkpoint loading excluded; each side warm: ours after one untimed pass, RecBole after its own "
        "valid and test evaluations); ours is `evaluation.evaluator.rank_valid_and_test`, what the trainer and "
        "`distillrec evaluate` run. GFLOP/s: the pass's floating-point operations (torch's FLOP counter: matrix "
        "products and attention; plus the GRU recurrences, counted as 6·(in + hidden)·hidden per position) over its "
        "time, against this machine's fp32 GEMM peak with the same thread count (best of 1024³ products). RSS: peak "
        "resident set of each side's whole process (import + data + training + evaluation); ours also per phase "
        "(each phase's own peak). "
        + (f"Ours with `ce_chunk: {a['ce_chunk']}` (CE over all items in chunks of that many positions: the "
           "training logits of one batch never exceed that many rows; a model option, off by default because it "
           "moves results at float-rounding level). " if a.get("ce_chunk") else "")
        + "Targets: epoch and eval time ≤ 1/3 of RecBole's, memory ≤ 1/2.",
        f"- RecBole: {', '.join(f'{k} {v}' for k, v in env['recbole']['installed'].items())} in "
        f"{env['recbole']['venv']} "
        f"(pins: {' + '.join(' '.join(p) for p in (PINS['step1'], PINS['step2']))}, "
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1); ours: distillrec on "
        f"torch {env['ours_torch']}, Python {env['python']}; host {env['host']} ({env['cpus']} CPUs).",
        "- split column: RecBole's own per-user valid/test items compared with ours ('same' = every user identical).",
        "- Each side's result is cached (`benchmarks/_work/results`, keyed by everything that changes it, ours also by "
        "the git commit) and reused by a rerun; these sides were computed at: "
        + "; ".join(f"{r['dataset']} {r['model']}: ours {r['ours'].get('computed_at', 'this run')}, RecBole "
                    f"{r['recbole'].get('computed_at', 'this run')}" for r in result["runs"]) + ".",
        f"- 1-min load average around the runs: {result['load_range']} on {env['cpus']} CPUs; other busy processes "
        "distort every timing (with 2 threads on 2 shared cores, a busy neighbour slowed both sides up to ~8x here).",
    ])


def resolve_batch(choice: str, info: dict[str, Any]) -> int:
    if choice == "matched":
        steps = math.ceil(info["train_rows_prefix"] / RECBOLE_BATCH)
        return max(1, math.ceil(info["train_windows"] / steps))
    return int(choice)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=None, help="epoch cap, the same on both sides (default 20; "
                                                            "200 with --time-to-quality)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many epochs without a better valid NDCG@10 (both sides; default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (default 2)")
    p.add_argument("--our-batch", default="matched",
                   help="our training batch in windows: 'matched' (same optimiser steps per epoch as RecBole's "
                        "2048 rows; default) or an integer")
    p.add_argument("--ce-chunk", type=int, default=2048,
                   help="our models' ce_chunk (CE over all items in chunks of this many positions; 0: off). "
                        "Default 2048, RecBole's batch of targets")
    p.add_argument("--seeds", type=int, nargs="+", default=[SEED], help=f"seeds, both sides (default {SEED})")
    p.add_argument("--time-to-quality", action="store_true",
                   help="train both sides to convergence (--epochs 200 --patience 10 unless given) and write the "
                        "time-to-quality table (<out>_time_to_quality.md): wall time until each side first reaches "
                        "RecBole's best valid NDCG@10, and test metrics with CIs over --seeds")
    p.add_argument("--fresh", action="store_true", help="rerun sides whose result is cached in _work/results")
    p.add_argument("--no-bucket", action="store_true",
                   help="our batches in shuffled order instead of length-bucketed (the table in the README used buckets)")
    p.add_argument("--out", default=str(HERE / "results" / "recbole_compare"),
                   help="output path without suffix: writes <out>.json and <out>.md "
                        "(default benchmarks/results/recbole_compare)")
    p.add_argument("--_ours-worker", dest="ours_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.epochs = args.epochs or (200 if args.time_to_quality else 20)
    args.patience = args.patience or (10 if args.time_to_quality else 5)
    if args.ours_worker:
        our_worker(args.ours_worker)
        return

    import torch

    t_all = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    env = {"recbole": ensure_venv(), "ours_torch": torch.__version__, "python": platform.python_version(),
           "host": platform.platform(), "cpus": os.cpu_count()}
    log(f"RecBole venv ok: {env['recbole']['installed']}")
    rows, raw, our_batch, datasets = [], [], {}, {}
    for ds in args.datasets:
        info = prepare_dataset(ds)
        batch = resolve_batch(args.our_batch, info)
        our_batch[ds] = batch
        datasets[ds] = {k: v for k, v in info.items() if k != "our_split"} | {"our_batch": batch}
        log(f"{ds}: {info['users']} users, {info['items']} items, {info['train_rows_prefix']} RecBole train rows, "
            f"{info['train_windows']} our windows -> our batch {batch}; {info['split_source']}")
        for model in args.models:
            for seed in args.seeds:
                log(f"{ds} / {model} / seed {seed}: ours")
                ours = cached("ours", info, model, args, seed, batch,
                              lambda: run_ours(info, model, args, batch, seed))
                log(f"  ours: {ours['epochs_run']} epochs, {ours['train_s_per_epoch_mean']:.2f} s/epoch, test "
                    f"NDCG@10 {ours['test']['ndcg@10']:.4f}, peak {ours['peak_rss_mb']:.0f} MB")
                log(f"{ds} / {model} / seed {seed}: RecBole {MODELS[model]}")
                rb = cached("recbole", info, model, args, seed, RECBOLE_BATCH,
                            lambda: run_recbole(info, model, args, seed))
                rb_ep = sum(rb["train_s_per_epoch"]) / max(1, len(rb["train_s_per_epoch"]))
                log(f"  RecBole: {rb['epochs_run']} epochs, {rb_ep:.1f} s/epoch, test NDCG@10 "
                    f"{rb['test']['ndcg@10']:.4f}, peak {rb['peak_rss_mb']:.0f} MB, split "
                    f"{'same' if rb['split_match']['ok'] else 'DIFFERS'}")
                if seed == args.seeds[0]:
                    rows.append(summarise_pair(ds, model, ours, rb))
                raw.append({"dataset": ds, "model": model, "seed": seed, "ours": ours, "recbole": rb})
    loads = [v for r in raw for side in ("ours", "recbole") for v in r[side]["loadavg_1min"].values()]
    result = {
        "args": vars(args) | {"ours_worker": None},
        "load_range": f"{min(loads):.1f}–{max(loads):.1f}" if loads else "–",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": env, "targets": TARGETS, "our_batch": our_batch, "datasets": datasets,
        "rows": rows, "runs": raw, "wall_s": round(time.perf_counter() - t_all, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    table, notes = render_table(rows), render_notes(result)
    out = Path(args.out)
    if args.time_to_quality:
        ttq, ttq_rows = time_to_quality_table(raw)
        result["time_to_quality"] = ttq_rows
        ttq_md = (f"# Time to quality: distillrec vs RecBole 1.2.1\n\n{ttq}\n\nBoth sides to convergence: epochs ≤ "
                  f"{args.epochs}, early stopping after {args.patience} validations without improvement (RecBole "
                  f"stopping_step={args.patience - 1}), {args.threads} torch thread(s) per side, seeds "
                  f"{', '.join(map(str, args.seeds))}. Time = training + validation of the epochs up to the first "
                  "whose valid NDCG@10 reaches the target (RecBole's best; data loading excluded on both sides). "
                  "Test = each side's best-validation epoch, ± 95% CI over seeds (one seed: ± 1.96 per-user "
                  "standard errors). Every other setting as in the main table's notes below.\n\n"
                  f"Command: `{result['command']}` ({time.strftime('%Y-%m-%d %H:%M')}; 1-min load average "
                  f"{result['load_range']} on {env['cpus']} CPUs)\n\n## The main table of the same runs\n\n"
                  f"{table}\n\nNotes:\n{notes}\n")
        Path(f"{out}_time_to_quality.md").write_text(ttq_md)
        print(ttq_md)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(f"{out}.json"), Path(f"{out}.md")
    # paths relative to the repository, so the committed results name no machine's folders
    json_path.write_text(json.dumps(result, indent=1).replace(str(HERE.parent) + "/", ""))
    md = (f"# distillrec vs RecBole 1.2.1 (SASRec, GRU4Rec)\n\n{table}\n\nNotes:\n{notes}\n\n"
          f"Command: `{result['command']}` ({result['wall_s']:.0f} s, {result['date']})\n")
    md_path.write_text(md)
    print(table)
    print("\nNotes:\n" + notes)
    print(f"\nwrote {json_path} and {md_path} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
