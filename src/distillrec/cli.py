"""The ``distillrec`` command line. Later issues extend it; existing commands and options keep working."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .data.dataset import DataError
from .training.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LLM-enhanced multimodal session recommendation.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, validate and export datasets.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Output folder."),
    seed: list[int] = typer.Option([1, 2, 3], "--seed", help="Seed(s); repeat for several (mean ± 95% CI)."),
):
    """Run the main job on the embedded demo shop and write a report."""
    from .quickstart import quickstart as run_quickstart

    try:
        run_quickstart(out, seeds=seed, console=console)
    except (DataError, ConfigError) as e:
        _fail(str(e))


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run configuration (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=0.001 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<config name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
):
    """Train and evaluate one model on one dataset (every seed of the config)."""
    from .training.config import load_config
    from .training.trainer import run

    try:
        cfg = load_config(config, set_)
        out = out or Path("runs") / config.stem
        metrics = run(cfg, out, resume=resume)
    except (DataError, ConfigError) as e:
        _fail(str(e))
    console.print_json(json.dumps({"valid": metrics["valid"], "test": metrics["test"]}, indent=1))
    console.print(f"run folder: {out}")


@app.command()
def evaluate(run_dir: Path = typer.Argument(..., help="A finished run folder.")):
    """Re-evaluate a run's best checkpoints on validation and test."""
    from .training.trainer import evaluate_run

    try:
        result = evaluate_run(run_dir)
    except (DataError, ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    console.print_json(json.dumps(result, indent=1))


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders; the first is the baseline."),
    metric: str = typer.Option("ndcg@10", help="Metric for the paired test."),
):
    """Table of runs with mean ± 95% CI and paired tests against the first run."""
    from .evaluation.report import compare_runs

    try:
        console.print(compare_runs(run_dirs, metric))
    except FileNotFoundError as e:
        _fail(str(e))


@app.command()
def recommend(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    items: list[str] = typer.Argument(..., help="The session: item ids as in your data, oldest first."),
    k: int = typer.Option(10, "-k", help="How many items."),
    exclude_seen: bool = typer.Option(False, "--exclude-seen", help="Leave out the session's own items."),
):
    """Top-k items for a session, with the run's best-validation model."""
    from .serving.recommend import TrainedRecommender

    try:
        recs = TrainedRecommender.from_run(run_dir).recommend(items, k, exclude_seen)
    except (DataError, ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    for item, score in recs:
        console.print(f"{item}\t{score:.4f}", highlight=False)


@app.command()
def embed(
    config: Path = typer.Argument(..., help="Embedding configuration (YAML), e.g. configs/embed/demo-smollm2.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set batch_size=8 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the config's output, else "
                                                           "runs/embed/<config name>)."),
):
    """Embed every item once with the multimodal LM (resumable shards; under torchrun, items are split across ranks)."""
    from .training.embed import embed_items, load_embed_config

    try:
        cfg = load_embed_config(config, set_)
        out = out or (Path(cfg.output) if cfg.output else Path("runs") / "embed" / config.stem)
        result = embed_items(cfg, out)
    except (DataError, ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    if result["rank"] == 0:
        console.print_json(json.dumps(result, indent=1))


@app.command()
def align(
    config: Path = typer.Argument(..., help="Alignment config (YAML), e.g. configs/align/scientific-mm.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set epochs=2 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: the config's out)."),
    restart: bool = typer.Option(False, "--restart", help="Ignore existing checkpoints and start again."),
):
    """Connector alignment pretraining (image features -> item text), with before/after caption loss and keyword recall."""
    from .training.align import main as run_alignment

    try:
        run_alignment(config, set_, out=out, restart=restart)
    except (DataError, ConfigError) as e:
        _fail(str(e))


@app.command()
def tpad(
    config: Path = typer.Argument(..., help="TPAD recipe (YAML), e.g. configs/tpad/demo.yaml."),
    stage: list[str] = typer.Option([], "--stage", help="Run up to these stages only: knowledge, transfer, align, "
                                                        "embed (repeatable; default: all). Earlier stages run first "
                                                        "when not finished."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set align.gamma1=0 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: the config's out)."),
    restart: bool = typer.Option(False, "--restart", help="Delete the run folder and start again."),
):
    """TPAD: Knowledge-MLLM, Transfer-MLLM, transitional pattern alignment, then item embeddings (resumable)."""
    from .training.tpad import STAGES, main as run_tpad_main

    try:
        run_tpad_main(config, set_, stages=stage or STAGES, out=out, restart=restart)
    except (DataError, ConfigError) as e:
        _fail(str(e))


@app.command("models")
def list_models():
    """List the registered recommenders."""
    from .models import available_models

    console.print("\n".join(available_models()))


@data_app.command("inspect")
def data_inspect(
    path: str = typer.Argument(..., help="A dataset folder or file, or a known dataset name."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Loader format (guessed from the files if omitted)."),
):
    """Print statistics and validate a dataset; exits 1 when it has errors."""
    from .data.validate import format_report, inspect_path

    try:
        report = inspect_path(path, fmt)
    except DataError as e:
        _fail(str(e))
    console.print(format_report(report), highlight=False, markup=False, soft_wrap=True)
    if report.get("errors", 0):
        raise typer.Exit(1)


@data_app.command("export-recbole")
def data_export_recbole(
    name: str = typer.Argument(..., help="A known dataset name (or use --format/--path)."),
    out: Path = typer.Option(..., "--out", help="Folder for the atomic files."),
    fmt: Optional[str] = typer.Option(None, "--format"),
    path: Optional[str] = typer.Option(None, "--path"),
):
    """Write a dataset as RecBole atomic files, to cross-check results with RecBole."""
    from .data.export import export_recbole
    from .data.loaders import load_dataset

    try:
        ds = load_dataset({"name": name, "format": fmt, "path": path})
        written = export_recbole(ds, out)
    except DataError as e:
        _fail(str(e))
    console.print(f"wrote {written}")


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
