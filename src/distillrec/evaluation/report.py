"""Markdown reports and plots for runs, and side-by-side tables of several runs with paired tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import paired_test, metrics_from_ranks

TABLE_METRICS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20")


def _fmt(mean: float, ci: float | None = None) -> str:
    return f"{mean:.4f}" if not ci or ci < 1e-9 else f"{mean:.4f} ± {ci:.4f}"


def plot_curves(per_seed: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss and validation metric per epoch, one line per seed; None when nothing was trained."""
    if not any(s.get("history") for s in per_seed):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for s in per_seed:
        h = s["history"]
        if not h:
            continue
        ep = [r["epoch"] for r in h]
        ax1.plot(ep, [r["train_loss"] for r in h], label=f"seed {s['seed']}")
        key = next(k for k in h[0] if k.startswith("valid_"))
        ax2.plot(ep, [r[key] for r in h], label=f"seed {s['seed']}")
        ax2.set_ylabel(key.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax2.set_xlabel("epoch")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_run_report(metrics: dict[str, Any], curves_png: Path | None = None) -> str:
    p = metrics["protocol"]
    lines = [
        f"# {metrics['model']} on {metrics['dataset']}",
        "",
        f"Protocol `{p['hash']}`: {p['candidates']} ranking, ties {p['tie_breaking']}, history masked: "
        f"{p['mask_history']}, max_len {p['max_len']}, split {p['split'].get('split')}, "
        f"dataset fingerprint `{p['dataset_fingerprint']}`; model selected on validation {p['select_metric']}.",
        f"Seeds: {', '.join(str(s['seed']) for s in metrics['seeds'])} (mean ± 95% CI over seeds where more than one).",
        "",
        "| split | " + " | ".join(TABLE_METRICS) + " |",
        "|---" * (len(TABLE_METRICS) + 1) + "|",
    ]
    for split in ("valid", "test"):
        ci = metrics.get(f"{split}_ci95", {})
        lines.append(
            f"| {split} | " + " | ".join(_fmt(metrics[split].get(m, float('nan')), ci.get(m)) for m in TABLE_METRICS) + " |"
        )
    lines += ["", "## Test slices", "", "| slice | bucket | n | hr@10 | ndcg@10 |", "|---|---|---|---|---|"]
    for group, buckets in metrics["slices"].items():
        for label, m in buckets.items():
            lines.append(f"| {group} | {label} | {m['n']} | {m.get('hr@10', 0):.4f} | {m.get('ndcg@10', 0):.4f} |")
    t = metrics["timing"]
    lines += [
        "",
        "## Timing",
        "",
        f"training {t['train_s']:.1f} s ({t['train_s_per_epoch']:.2f} s/epoch), evaluation {t['eval_s']:.1f} s, "
        f"peak RSS {t['peak_rss_mb']:.0f} MB, processes {t['world_size']}.",
        "",
        "| seed | best epoch | epochs run | valid ndcg@10 | test ndcg@10 |",
        "|---|---|---|---|---|",
    ]
    for s in metrics["seeds"]:
        lines.append(
            f"| {s['seed']} | {s['best_epoch']} | {s['epochs_run']} | {s['valid'].get('ndcg@10', 0):.4f} | "
            f"{s['test'].get('ndcg@10', 0):.4f} |"
        )
    if curves_png is not None:
        lines += ["", f"![training curves]({Path(curves_png).name})"]
    return "\n".join(lines) + "\n"


def load_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is '{run_dir}' a finished run directory?")
    return json.loads(path.read_text())


def run_test_ranks(run_dir: Path, seed: int) -> np.ndarray:
    return np.load(Path(run_dir) / "ranks" / f"test_seed{seed}.npy", allow_pickle=False)


def compare_runs(run_dirs: list[Path], metric: str = "ndcg@10") -> str:
    """A Markdown table of several runs (mean ± CI) and a paired test of each against the first run.

    The paired test uses per-row metric values averaged over the seeds both runs share, on the same test rows."""
    runs = [load_run(d) for d in run_dirs]
    k = int(metric.split("@")[1])
    lines = [
        f"| run | model | seeds | test hr@{k} | test {metric} | Δ vs first | paired t p | Wilcoxon p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_dir, base = run_dirs[0], runs[0]
    for d, r in zip(run_dirs, runs):
        seeds = [s["seed"] for s in r["seeds"]]
        row = (
            f"| {Path(d).name} | {r['model']} | {len(seeds)} | "
            f"{_fmt(r['test'][f'hr@{k}'], r.get('test_ci95', {}).get(f'hr@{k}'))} | "
            f"{_fmt(r['test'][metric], r.get('test_ci95', {}).get(metric))} |"
        )
        if d is base_dir:
            lines.append(row + " – | – | – |")
            continue
        if r["protocol"]["hash"] != base["protocol"]["hash"]:
            lines.append(row + " protocols differ | – | – |")
            continue
        base_seeds = [s["seed"] for s in base["seeds"]]
        a = np.mean([metrics_from_ranks(run_test_ranks(d, s), (k,))[metric] for s in seeds], axis=0)
        b = np.mean([metrics_from_ranks(run_test_ranks(base_dir, s), (k,))[metric] for s in base_seeds], axis=0)
        t = paired_test(a, b, metric)
        lines.append(row + f" {t.mean_diff:+.4f} | {t.t_pvalue:.3g} | {t.wilcoxon_pvalue:.3g} |")
    return "\n".join(lines) + "\n"
