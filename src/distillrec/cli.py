"""The ``distillrec`` command line. Every command answers a user's mistake (a bad config, path, option or data file)
with exit code 2 and one line that names it and the fix (:class:`~distillrec.errors.UserError`), never a traceback.

Long commands resume by default: rerunning ``train``, ``tpad``, ``align``, ``method`` or ``embed`` with the same
config and folder continues where a killed run stopped and reuses what finished; ``--restart`` starts over, deleting
only what that command writes, and only in a folder that is one of its runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

# before torch is imported (OpenMP reads it once): threads that wait sleep instead of spinning, so a job on a core
# shared with another process does not burn that core waiting (config.auto_threads; benchmarks/shared_cpu.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import ConfigError, DataError, UserError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LLM-enhanced multimodal session recommendation.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, validate and export datasets.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

# the errors a user can fix: their own data and configs, and paths they gave
_USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _fail(message: str) -> None:
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    err_console.print(f"[red]error:[/red] {escape(one_line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every command: a user error ends in one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as e:
            if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e.strerror or ""):
                _fail(f"{e.filename}: {e.strerror or e}")
            _fail(str(e))

    return wrapper


def command(group: typer.Typer = app, name: str | None = None, **kw: Any) -> Callable:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        return group.command(name, **kw)(user_errors(fn))

    return register


@command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Output folder."),
    seed: list[int] = typer.Option([1, 2, 3], "--seed", help="Seed(s); repeat for several (mean ± 95% CI)."),
):
    """Run the main job on the embedded demo shop and write a report."""
    from .quickstart import quickstart as run_quickstart

    run_quickstart(out, seeds=seed, console=console)


@command()
def train(
    config: Path = typer.Argument(..., help="Run configuration (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=0.001 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<config name>)."),
    restart: bool = typer.Option(False, "--restart", help="Start over instead of resuming the run in --out."),
    resume: bool = typer.Option(True, "--resume", hidden=True, help="Kept for old scripts: resuming is the default."),
):
    """Train and evaluate one model on one dataset (every seed of the config); resumes a killed run."""
    from .runs import load_config
    from .training.trainer import run

    cfg = load_config(config, set_)
    out = out or Path("runs") / config.stem
    metrics = run(cfg, out, resume=not restart)
    console.print_json(json.dumps({"valid": metrics["valid"], "test": metrics["test"]}, indent=1))
    console.print(f"run folder: {out}")


@command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    candidates: Optional[Path] = typer.Option(
        None, "--candidates", help="A candidate file (`distillrec candidates`): SAMPLED evaluation on its rows, "
                                   "1 target + N negatives each, instead of full ranking."),
):
    """Re-evaluate a run's best checkpoints on validation and test (full ranking), or on a sampled candidate file."""
    if candidates is None:
        from .runs import evaluate_run

        console.print_json(json.dumps(evaluate_run(run_dir), indent=1))
        return
    from .runs import evaluate_run_on_candidates

    result = evaluate_run_on_candidates(run_dir, candidates)
    console.print(result["protocol"]["label"] + f" -- protocol hash {result['protocol']['hash']}", highlight=False,
                  markup=False, soft_wrap=True)
    console.print_json(json.dumps(result, indent=1))


@command(name="candidates")
def sample_candidate_file(
    dataset_config: str = typer.Argument(..., help="A run config or dataset config (YAML), a dataset folder, or a "
                                                   "known dataset name (as `distillrec data inspect` reads it)."),
    out: Path = typer.Option(..., "--out", help="The candidate file to write (safetensors + JSON metadata)."),
    split: str = typer.Option("test", "--split", help="test or valid."),
    negatives: int = typer.Option(20, "--negatives", help="Negatives per row (MLLM-MSR: 20)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the negatives (and of --max-users)."),
    max_users: Optional[int] = typer.Option(None, "--max-users", help="Rows drawn at random by seed (default: all)."),
):
    """Sample the candidates of the SAMPLED protocol (1 target + N never-seen negatives per row) once, so that every
    model is scored on the very same ones (`distillrec evaluate RUN --candidates FILE`)."""
    from .data.validate import load_dataset_source
    from .evaluation.candidates import sample_candidates
    from .evaluation.evaluator import sampled_protocol

    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; give a file name, e.g. {out / 'candidates.safetensors'}")
    dataset = load_dataset_source(dataset_config)
    cands = sample_candidates(dataset, split, n_negatives=negatives, seed=seed, max_users=max_users)
    cands.save(out)
    console.print_json(json.dumps({"dataset": dataset.name, **sampled_protocol(cands)}, indent=1))
    console.print(f"wrote {out}", highlight=False, markup=False)


@command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders; the first is the baseline."),
    metric: str = typer.Option("ndcg@10", help="Metric for the paired test."),
    split: str = typer.Option("test", help="test, or valid (for choices made on validation)."),
):
    """Table of runs with mean ± 95% CI and paired tests against the first run."""
    from .runs import compare_runs

    console.print(compare_runs(run_dirs, metric, split))


@command()
def recommend(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    items: list[str] = typer.Argument(..., help="The session: item ids as in your data, oldest first."),
    k: int = typer.Option(10, "-k", help="How many items."),
    exclude_seen: bool = typer.Option(False, "--exclude-seen", help="Leave out the session's own items."),
):
    """Top-k items for a session, with the run's best-validation model."""
    from .serving.recommend import TrainedRecommender

    if k < 1:
        raise ConfigError(f"-k {k}: ask for at least one item")
    for item, score in TrainedRecommender.from_run(run_dir).recommend(items, k, exclude_seen):
        console.print(f"{item}\t{score:.4f}", highlight=False)


@command()
def serve(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: a free one; the address is printed)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Which seed's model (default: the run's first seed)."),
    threads: int = typer.Option(1, "--threads", help="Torch threads for scoring."),
    max_batch: int = typer.Option(64, "--max-batch", help="The most waiting requests scored in one batch."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
):
    """HTTP API (POST /recommend, /recommend/batch; GET /health, /items, /items/{id}; docs at /docs) and a web page
    (/) over a run's best-validation model; concurrent requests are scored in micro-batches."""
    try:
        from .serving.app import serve as run_server
    except ImportError as e:
        raise ConfigError(f"`distillrec serve` needs the [serve] extra ({e.name} is missing): "
                          "pip install 'distillrec[serve]'") from None
    from .config import set_num_threads

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: give a port between 0 and 65535 (0: a free one)")
    if threads < 1 or max_batch < 1:
        raise ConfigError(f"--threads {threads} / --max-batch {max_batch}: give at least 1")
    set_num_threads(threads)

    def announce(line: str) -> None:  # the address, flushed: a script or test waits for this line
        console.print(line, highlight=False, markup=False, soft_wrap=True)
        console.file.flush()

    run_server(run_dir, host=host, port=port, seed=seed, max_batch=max_batch, access_log=access_log,
               announce=announce)


@command()
def embed(
    config: Path = typer.Argument(..., help="Embedding configuration (YAML), e.g. configs/embed/demo-smollm2.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set batch_size=8 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the config's out, else "
                                                           "runs/embed/<config name>)."),
):
    """Embed every item once with the multimodal LM (resumable shards; under torchrun, items are split across ranks)."""
    from .training.embed import embed_items, load_embed_config

    cfg = load_embed_config(config, set_)
    out = out or (Path(cfg.out) if cfg.out else Path("runs") / "embed" / config.stem)
    result = embed_items(cfg, out)
    if result["rank"] == 0:
        console.print_json(json.dumps(result, indent=1))


def _run_method(name: str, config: Path, stage: list[str], set_: list[str], out: Optional[Path],
                restart: bool) -> None:
    from .methods.registry import run_method

    run_method(name, config, set_, stages=stage, out=out, restart=restart)


_STAGE_HELP = "Run up to this stage only (repeatable; default: all). Earlier stages run first when not finished."
_SET_HELP = "Override a key: --set seed=1 (repeatable)."
_OUT_HELP = "Run folder (default: the config's out)."
_RESTART_HELP = "Start over: delete what this method wrote in the run folder (nothing else)."


@command()
def method(
    name: str = typer.Argument(..., help="The method (see `distillrec methods`)."),
    config: Path = typer.Argument(..., help="Its recipe (YAML)."),
    stage: list[str] = typer.Option([], "--stage", help=_STAGE_HELP),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help=_OUT_HELP),
    restart: bool = typer.Option(False, "--restart", help=_RESTART_HELP),
):
    """Run an LLM method's stages (resumable); `distillrec tpad` and `distillrec align` are aliases."""
    _run_method(name, config, stage, set_, out, restart)


@command(name="methods")
def list_methods():
    """List the LLM methods, their stages and an example recipe."""
    from .methods.registry import METHODS

    for m in METHODS.values():
        stages = " -> ".join(m.stages) if m.stages else "one stage"
        console.print(f"{m.name}\t{stages}\t{m.example}\t{m.summary}", highlight=False)


@command()
def align(
    config: Path = typer.Argument(..., help="Alignment config (YAML), e.g. configs/align/scientific-mm.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set epochs=2 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help=_OUT_HELP),
    restart: bool = typer.Option(False, "--restart", help=_RESTART_HELP),
):
    """Connector alignment pretraining (image features -> item text); before/after caption loss and keyword recall."""
    _run_method("align", config, [], set_, out, restart)


@command()
def tpad(
    config: Path = typer.Argument(..., help="TPAD recipe (YAML), e.g. configs/tpad/demo.yaml."),
    stage: list[str] = typer.Option([], "--stage", help="knowledge, transfer, align or embed. " + _STAGE_HELP),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set align.gamma1=0 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help=_OUT_HELP),
    restart: bool = typer.Option(False, "--restart", help=_RESTART_HELP),
):
    """TPAD: Knowledge-MLLM, Transfer-MLLM, transitional pattern alignment, then item embeddings (resumable)."""
    _run_method("tpad", config, stage, set_, out, restart)


@command(name="models")
def list_models():
    """List the registered recommenders."""
    from .models import available_models

    console.print("\n".join(available_models()))


@command(data_app, "inspect")
def data_inspect(
    path: str = typer.Argument(..., help="A dataset folder or file, or a known dataset name."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Loader format (guessed from the files if omitted)."),
    option: list[str] = typer.Option(
        [], "--option", help="A loader option key=value, the value read as YAML (repeatable): --option stem=Beauty."),
):
    """Print statistics and validate a dataset; exits 1 when it has errors."""
    from .data.validate import format_report, inspect_path, parse_option

    options = dict(parse_option(o) for o in option)
    report = inspect_path(path, fmt, options=options)
    console.print(format_report(report), highlight=False, markup=False, soft_wrap=True)
    if report.get("errors", 0):
        raise typer.Exit(1)


@command(data_app, "export-recbole")
def data_export_recbole(
    name: str = typer.Argument(..., help="A known dataset name (or use --format/--path)."),
    out: Path = typer.Option(..., "--out", help="Folder for the atomic files."),
    fmt: Optional[str] = typer.Option(None, "--format"),
    path: Optional[str] = typer.Option(None, "--path"),
):
    """Write a dataset as RecBole atomic files, to cross-check results with RecBole."""
    from .data.export import export_recbole
    from .data.loaders import load_dataset

    ds = load_dataset({"name": name, "format": fmt, "path": path})
    console.print(f"wrote {export_recbole(ds, out)}")


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
