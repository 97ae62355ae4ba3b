"""The main job on the embedded demo shop: every baseline under one protocol, one combined report.

Later issues add TPAD (and its downstream DIMO) to the list; the command and its outputs stay the same.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .data.loaders import load_dataset
from .evaluation.report import compare_runs
from .training.config import load_config
from .training.trainer import run

# (run name, model, params, train overrides): small, fast settings for a 2-core laptop
QUICKSTART_RUNS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("pop", "pop", {}, {}),
    ("sknn", "sknn", {"k": 100}, {}),
    ("gru4rec", "gru4rec", {}, {"epochs": 15, "lr": 0.003}),
    ("sasrec", "sasrec", {"hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2}, {"epochs": 15, "lr": 0.002}),
    ("fused_sasrec", "fused_sasrec", {"features": ["attributes_onehot"], "hidden_dropout_prob": 0.2,
                                      "attn_dropout_prob": 0.2}, {"epochs": 15, "lr": 0.002}),
    ("srgnn", "srgnn", {}, {"epochs": 4, "batch_size": 128}),
]


def quickstart(out: Path, seeds: list[int] | None = None, console: Console | None = None) -> Path:
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    console.print("[bold]distillrec quickstart[/bold]: generating the demo shop (no download) ...")
    dataset_cfg = {"name": "demo"}
    dataset = load_dataset(dataset_cfg)
    console.print(f"  {dataset.statistics()}")
    run_dirs = []
    for i, (name, model, params, train) in enumerate(QUICKSTART_RUNS, 1):
        console.print(f"[{i}/{len(QUICKSTART_RUNS)}] {name} (elapsed {time.perf_counter() - t0:.0f}s)")
        cfg = load_config(
            {
                "model": {"name": model, "params": params},
                "dataset": dataset_cfg,
                "train": {"patience": 3, "batch_size": 256, "seeds": seeds or [1, 2, 3], **train},
            }
        )
        metrics = run(cfg, out / name, dataset=dataset)
        console.print(
            f"    valid ndcg@10 {metrics['valid']['ndcg@10']:.4f}  test hr@10 {metrics['test']['hr@10']:.4f} "
            f"ndcg@10 {metrics['test']['ndcg@10']:.4f}  ({metrics['timing']['train_s']:.0f}s training)"
        )
        run_dirs.append(out / name)
    table = compare_runs(run_dirs)
    report = (
        "# distillrec quickstart: the demo shop\n\n"
        f"Dataset: {dataset.statistics()}\n\n"
        "Full ranking over all items, pessimistic ties, history not masked, best-validation epoch tested. "
        "Paired tests are against the first row (Pop), per test user.\n\n" + table +
        "\nEach run's own report (slices, curves, timing): `<run>/report.md`.\n"
    )
    (out / "report.md").write_text(report)
    console.print(table)
    console.print(f"report: {out / 'report.md'}  (total {time.perf_counter() - t0:.0f}s)")
    return out / "report.md"
