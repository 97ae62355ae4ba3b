"""Markdown reports and plots for runs, and side-by-side tables of several runs with paired tests.

Also the one home of the small renderers every report of the project uses (run reports, the quickstart, the method
reports, the benchmarks): :func:`fmt_number` for a number in a table cell, :func:`markdown_table` for a table, and
:func:`plot_panels` (with :func:`pyplot` and :func:`save_figure`) for figures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import paired_test, metrics_from_ranks

TABLE_METRICS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20")
MISSING = "–"  # a table cell without a value (None, NaN)


# ---------------------------------------------------------------------------------------------------- renderers


def fmt_number(x: Any, digits: int = 4, ci: float | None = None) -> str:
    """A number with ``digits`` decimals; ``"–"`` for None and NaN (no value); non-numbers (and bools) as
    ``str(x)``. With ``ci`` (a confidence half-width) of at least 1e-9: ``"mean ± ci"``; a zero or missing ``ci`` (one
    seed) prints the mean alone."""
    if x is None:
        return MISSING
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return str(x)
    if math.isnan(x):
        return MISSING
    text = f"{x:.{digits}f}"
    return f"{text} ± {ci:.{digits}f}" if ci is not None and ci >= 1e-9 else text


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (no trailing newline). Cells are ``str()``-ed (format numbers with :func:`fmt_number`
    first), with ``|`` escaped and newlines flattened so that any text stays in its cell; every row must have as
    many cells as the header."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    lines = [line(header), "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"markdown_table: a row has {len(row)} cells, the header {len(header)}: {list(row)}")
        lines.append(line(row))
    return "\n".join(lines)


@dataclass
class Panel:
    """One line plot of :func:`plot_panels`: ``lines`` are ``(label, xs, ys)``; the legend shows the labels."""

    lines: list[tuple[str, Sequence[Any], Sequence[Any]]] = field(default_factory=list)
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    legend: bool = True


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use: a report without figures never
    loads matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 100 dpi) and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def plot_panels(panels: Sequence[Panel], path: Path, panel_size: tuple[float, float] = (4.5, 3.2)) -> Path:
    """One row of line plots, ``panel_size`` inches each, written to ``path``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, xs, ys in panel.lines:
            ax.plot(xs, ys, label=label)
        if panel.title:
            ax.set_title(panel.title)
        if panel.xlabel:
            ax.set_xlabel(panel.xlabel)
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        if panel.legend:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- run reports


def plot_curves(per_seed: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss and validation metric per epoch, one line per seed; None when nothing was trained."""
    trained = [s for s in per_seed if s.get("history")]
    if not trained:
        return None
    loss = Panel(xlabel="epoch", ylabel="training loss")
    valid = Panel(xlabel="epoch", legend=False)
    for s in trained:
        h = s["history"]
        ep = [r["epoch"] for r in h]
        key = next(k for k in h[0] if k.startswith("valid_"))
        loss.lines.append((f"seed {s['seed']}", ep, [r["train_loss"] for r in h]))
        valid.lines.append((f"seed {s['seed']}", ep, [r[key] for r in h]))
        valid.ylabel = key.replace("_", " ")
    return plot_panels([loss, valid], path, panel_size=(4.5, 3.2))


def _phase_peaks(timing: dict) -> str:
    by = timing.get("peak_rss_mb_by_phase")
    if not by:
        return ""
    what = "each phase's own peak" if by.get("per_phase") else "the peak by the end of each phase"
    parts = ", ".join(f"{k} {v:.0f}" for k, v in by.items() if k != "per_phase")
    return f" ({what}: {parts} MB)"


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
        markdown_table(
            ["split", *TABLE_METRICS],
            [[split] + [fmt_number(metrics[split].get(m), ci=metrics.get(f"{split}_ci95", {}).get(m))
                        for m in TABLE_METRICS] for split in ("valid", "test")],
        ),
        "",
        "## Test slices",
        "",
        markdown_table(
            ["slice", "bucket", "n", "hr@10", "ndcg@10"],
            [[group, label, m["n"], fmt_number(m.get("hr@10", 0.0)), fmt_number(m.get("ndcg@10", 0.0))]
             for group, buckets in metrics["slices"].items() for label, m in buckets.items()],
        ),
    ]
    t = metrics["timing"]
    lines += [
        "",
        "## Timing",
        "",
        f"training {t['train_s']:.1f} s ({t['train_s_per_epoch']:.2f} s/epoch), evaluation {t['eval_s']:.1f} s, "
        f"peak RSS {t['peak_rss_mb']:.0f} MB{_phase_peaks(t)}, processes {t['world_size']}.",
        "",
        markdown_table(
            ["seed", "best epoch", "epochs run", "valid ndcg@10", "test ndcg@10"],
            [[s["seed"], s["best_epoch"], s["epochs_run"], fmt_number(s["valid"].get("ndcg@10", 0.0)),
              fmt_number(s["test"].get("ndcg@10", 0.0))] for s in metrics["seeds"]],
        ),
    ]
    if curves_png is not None:
        lines += ["", f"![training curves]({Path(curves_png).name})"]
    return "\n".join(lines) + "\n"
