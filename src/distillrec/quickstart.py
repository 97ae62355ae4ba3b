"""The main job on the embedded demo shop: TPAD (all stages, one-time item embeddings), DIMO on TPAD embeddings and
on the raw encoder features, fused SASRec on TPAD embeddings, and every classic baseline, under one protocol, in
one combined report (results table with paired tests, TPAD training curves, a 2-D PCA of DIMO's ID and modality
item tables).

The TPAD recipe is ``QUICKSTART_TPAD`` (identical to ``configs/tpad/demo.yaml``, a test checks it); the downstream
runs are ``QUICKSTART_RUNS``. Every part resumes: TPAD stages from their checkpoints; finished runs are reused as
they are (nothing retrained, re-evaluated or appended to their ``train.log``).

The README's quickstart numbers are rendered here too (:func:`readme_results`, written to ``readme_results.md``):
the results table in the README's own format and the keyword-generation and probe numbers its text quotes.
``tests/test_quickstart.py`` checks the README against them for a finished quickstart folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from .config import auto_threads, set_num_threads
from .data.embeddings import attach_item_embeddings
from .data.loaders import load_dataset
from .features.cache import encode_missing_features
from .evaluation.report import Panel, fmt_number, markdown_table, plot_panels, pyplot, save_figure
from .files import atomic_write_text, folder_lock
from .methods.tpad.config import TPADConfig
from .methods.tpad.pipeline import run_tpad
from .errors import UserError
from .runs import RunConfig, compare_runs, dump_config, load_config
from .training.trainer import run

DEMO = {"name": "demo"}

# == configs/tpad/demo.yaml (without `out`)
QUICKSTART_TPAD: dict[str, Any] = {
    "dataset": {"name": "demo"},
    "lm": {"name": "smollm2-135m-instruct", "dtype": "float32", "seed": 0},
    "multimodal": {"num_layers": 8, "connector": "mlp", "use_chat_template": False, "max_text_tokens": 32,
                   "lora_r": 8},
    "image_features": "image_effnet_lite0",
    "text_fields": ["title", "category"],
    "text_view": "text_minilm",
    "keywords": {"source": "metadata", "fields": ["category", "brand", "colour"], "category_field": "category",
                 "title_terms": 1},
    "knowledge": {"epochs": 1, "batch_size": 16, "lr": 0.003, "max_items": 1000, "gr_items": 48,
                  "gr_max_new_tokens": 16},
    "transfer": {"epochs": 3, "steps_per_epoch": 20, "batch_size": 16, "lr": 0.002, "max_order": 3,
                 "context_items": 2, "heldout_pairs": 128},
    "align": {"epochs": 1, "batch_size": 16, "lr": 0.001, "max_items": 1000, "gamma1": 0.1, "gamma2": 0.1,
              "q_steps": 3},
    "embed_batch_size": 32,
    "autocast": "bf16",
    "seed": 0,
}

TPAD_FEATURES = ["tpad_image", "tpad_text"]
RAW_FEATURES = ["image_effnet_lite0", "text_minilm"]
_DIMO = {"embedding_dim": 64}
_DIMO_TRAIN = {"epochs": 6, "batch_size": 256, "lr": 0.003}

# (run name, model, params, train overrides): small, fast settings for a 2-core laptop
QUICKSTART_RUNS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("pop", "pop", {}, {}),
    ("sknn", "sknn", {"k": 100}, {}),
    ("gru4rec", "gru4rec", {}, {"epochs": 15, "lr": 0.003}),
    ("sasrec", "sasrec", {"hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2}, {"epochs": 15, "lr": 0.002}),
    ("fused_sasrec", "fused_sasrec", {"features": ["attributes_onehot"], "hidden_dropout_prob": 0.2,
                                      "attn_dropout_prob": 0.2}, {"epochs": 15, "lr": 0.002}),
    ("srgnn", "srgnn", {}, {"epochs": 4, "batch_size": 128}),
    ("fused_sasrec_tpad", "fused_sasrec", {"features": TPAD_FEATURES, "hidden_dropout_prob": 0.2,
                                           "attn_dropout_prob": 0.2}, {"epochs": 15, "lr": 0.002}),
    ("dimo_raw", "dimo", {**_DIMO, "features": RAW_FEATURES}, _DIMO_TRAIN),
    ("dimo_tpad", "dimo", {**_DIMO, "features": TPAD_FEATURES}, _DIMO_TRAIN),
]


def quickstart(out: Path, seeds: list[int] | None = None, console: Console | None = None, *,
               dataset_cfg: dict[str, Any] | None = None, tpad_overrides: dict[str, Any] | None = None,
               runs: list[tuple[str, str, dict[str, Any], dict[str, Any]]] | None = None,
               workers: int | None = None) -> Path:
    """Run the main job into ``out``. ``dataset_cfg``, ``tpad_overrides`` (merged into ``QUICKSTART_TPAD`` one
    level deep) and ``runs`` exist for tests and experiments; the command uses the defaults. ``workers``: how many
    CPUs the job uses (default ``config.auto_threads()``: those other processes leave free). Above 1, TPAD runs in
    this process on half of them while the downstream runs train beside it, each a ``distillrec train`` process
    with one thread, as soon as their inputs exist (:class:`_RunPool`), then ``workers`` at a time; 1 runs
    everything one after the other in this process. The downstream runs' results do not depend on the thread count
    (tests/test_resources.py); TPAD's do, at float level, so TPAD gets ``workers // 2`` threads in the first mode
    and ``config.auto_threads()`` in the second: one either way on a 2-core machine."""
    console = console or Console()
    demo = dataset_cfg or DEMO
    runs = QUICKSTART_RUNS if runs is None else runs
    with folder_lock(out) as out:  # one quickstart writes a folder at a time
        return _quickstart(out, seeds, console, demo, tpad_overrides, runs, workers)


def _train_runs(jobs: list[tuple[str, RunConfig]], out: Path, dataset: Any, console: Console, elapsed: Any) -> None:
    """Train every (name, config) into ``out/<name>`` in this process, one after the other (finished runs are
    reused as they are)."""
    for i, (name, cfg) in enumerate(jobs, 1):
        console.print(f"[{i}/{len(jobs)}] {name} (elapsed {elapsed()})")
        _print_done(console, name, run(cfg, out / name, dataset=dataset), elapsed)


def _print_done(console: Console, name: str, metrics: dict[str, Any], elapsed: Any) -> None:
    console.print(
        f"    {name}: valid ndcg@10 {metrics['valid']['ndcg@10']:.4f}  test hr@10 {metrics['test']['hr@10']:.4f} "
        f"ndcg@10 {metrics['test']['ndcg@10']:.4f}  ({metrics['timing']['train_s']:.0f}s training, "
        f"elapsed {elapsed()})", highlight=False)


class _RunPool:
    """Trains runs as ``distillrec train`` subprocesses with one torch thread each, at most ``slots`` at a time, in
    a background thread, while this process runs TPAD. A job starts once its gate (a ``threading.Event``, or None)
    is set: runs on TPAD's embeddings wait for TPAD; the raw encoder features are on disk before the pool starts,
    so a run on them loads them from the feature cache. Small models use a second thread
    poorly: on 2 cores, TPAD on one thread beside one-thread runs finishes the whole job sooner than TPAD on two
    threads followed by the runs. The first failed run stops the pool; :meth:`join` raises its error."""

    def __init__(self, jobs: list[tuple[str, RunConfig, threading.Event | None]], out: Path, slots: int,
                 console: Console, elapsed: Any):
        self.pending = list(jobs)
        self.out, self.slots, self.console, self.elapsed = out, slots, console, elapsed
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._running: dict[str, subprocess.Popen] = {}
        (out / "logs").mkdir(exist_ok=True)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _launch(self, name: str, cfg: RunConfig) -> None:
        cfg_path = self.out / "logs" / f"{name}.yaml"
        one_thread = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_threads": 1,
                                                                                  "progress": False})})
        atomic_write_text(cfg_path, dump_config(one_thread))
        log_path = self.out / "logs" / f"{name}.log"
        with open(log_path, "w") as log:
            self._running[name] = subprocess.Popen([sys.executable, "-m", "distillrec", "train", str(cfg_path),
                                                    "--out", str(self.out / name)],
                                                   stdout=log, stderr=subprocess.STDOUT)
        self.console.print(f"  started {name} (elapsed {self.elapsed()}; log {log_path})", highlight=False)

    def _loop(self) -> None:
        try:
            while (self.pending or self._running) and not self._stop.is_set():
                for job in list(self.pending):
                    name, cfg, gate = job
                    if len(self._running) < self.slots and (gate is None or gate.is_set()):
                        self.pending.remove(job)
                        self._launch(name, cfg)
                time.sleep(0.2)
                for name, proc in list(self._running.items()):
                    if proc.poll() is None:
                        continue
                    del self._running[name]
                    if proc.returncode != 0:
                        log_path = self.out / "logs" / f"{name}.log"
                        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
                        raise UserError(f"quickstart: the run '{name}' failed (exit {proc.returncode}); its log "
                                        f"{log_path} ends: {tail}")
                    _print_done(self.console, name, json.loads((self.out / name / "metrics.json").read_text()),
                                self.elapsed)
        except BaseException as e:  # noqa: BLE001  (raised again by join)
            self.error = e
        finally:
            for proc in self._running.values():
                proc.terminate()

    def join(self) -> None:
        while self._thread.is_alive():
            self._thread.join(0.5)
        if self.error is not None:
            raise self.error
        if self.pending:
            raise UserError(f"quickstart: runs never started: {[name for name, *_ in self.pending]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _quickstart(out: Path, seeds: list[int] | None, console: Console, demo: dict[str, Any],
                tpad_overrides: dict[str, Any] | None, runs: list[tuple[str, str, dict[str, Any], dict[str, Any]]],
                workers: int | None = None) -> Path:
    t0 = time.perf_counter()
    elapsed = lambda: f"{time.perf_counter() - t0:.0f}s"  # noqa: E731
    console.print("[bold]distillrec quickstart[/bold]: generating the demo shop (no download) ...")
    dataset = load_dataset(demo)
    console.print(f"  {dataset.statistics()}")

    recipe = {**QUICKSTART_TPAD, "dataset": demo, "out": str(out / "tpad")}
    for k, v in (tpad_overrides or {}).items():
        recipe[k] = {**recipe[k], **v} if isinstance(v, dict) and isinstance(recipe.get(k), dict) else v
    emb_dir = out / "tpad" / "embeddings"
    with_tpad = {**demo, "embeddings": {"tpad": str(emb_dir.resolve())}}
    # runs on the raw encoder features read MiniLM over TPAD's text fields, the same cached features TPAD reads
    with_raw = {**demo, "encoder_text_fields": recipe["text_fields"]}
    jobs = []
    for name, model, params, train in runs:
        features = set(params.get("features", []))
        jobs.append((name, load_config({
            "model": {"name": model, "params": params},
            "dataset": with_tpad if features & set(TPAD_FEATURES) else with_raw if features & set(RAW_FEATURES)
            else demo,
            "train": {"patience": 3, "batch_size": 256, "seeds": seeds or [1, 2, 3], **train},
        })))
    workers = workers or auto_threads()
    # the raw encoder features first, on every CPU: TPAD's data step and the runs on them read them from here
    raw = [n for n in RAW_FEATURES if any(n in cfg.feature_names() for _, cfg in jobs)
           or n in (recipe.get("image_features"), recipe.get("text_view"))]
    if raw:
        console.print(f"raw encoder features {raw} (elapsed {elapsed()})", highlight=False)
        set_num_threads(workers)
        encode_missing_features(dataset.items, raw, recipe["text_fields"], show_progress=recipe.get("progress", True))
    tpad_ready = threading.Event()
    pool = None
    if workers > 1:
        # TPAD in this process on half the CPUs; the runs beside it, one thread each (those on TPAD's embeddings
        # once they exist), then `workers` at a time
        recipe["num_threads"] = max(1, workers // 2)
        gated = [(name, cfg, tpad_ready if set(cfg.feature_names()) & set(TPAD_FEATURES) else None)
                 for name, cfg in jobs]
        gated.sort(key=lambda j: j[1].model.name != "dimo")  # the longest first among those ready
        console.print(f"[bold]{len(jobs)} runs[/bold]: {workers - recipe['num_threads']} at a time beside TPAD "
                      f"({recipe['num_threads']} thread(s)), then {workers} at a time", highlight=False)
        pool = _RunPool(gated, out, workers - recipe["num_threads"], console, elapsed)
    try:
        console.print(f"[bold]TPAD[/bold] (elapsed {elapsed()}): knowledge -> transfer -> alignment -> embeddings")
        tpad_cfg = TPADConfig(**recipe)
        tpad_report = run_tpad(tpad_cfg, dataset=dataset, log=lambda s: console.print(f"    {s}", highlight=False))
        attach_item_embeddings(dataset, "tpad", emb_dir)
        tpad_ready.set()
        if pool is None:
            console.print(f"[bold]{len(jobs)} runs[/bold] (elapsed {elapsed()}), one at a time")
            _train_runs(jobs, out, dataset, console, elapsed)
        else:
            pool.slots = workers  # this process only waits now
            pool.join()
    finally:
        if pool is not None:
            pool.stop()
    run_dirs = [out / name for name, _ in jobs]
    table = compare_runs(run_dirs)
    curves = plot_tpad_curves(tpad_report, out / "tpad_curves.png")
    pca = plot_id_vs_modality(out / "dimo_tpad", dataset, out / "dimo_tpad_pca.png")
    gr = markdown_table(
        ["stage", "epoch", "GR both", "GR image", "GR text"],
        [[stage, h["epoch"], *(fmt_number(h.get(k), 3) for k in ("gr_both", "gr_image", "gr_text"))]
         for stage in ("knowledge", "align") for h in tpad_report["stages"].get(stage, {}).get("history", [])],
    )
    probe = tpad_report.get("probe") or {}
    probe_md = markdown_table(
        ["embedding", "valid HR@10", "valid MRR", "test HR@10", "test MRR"],
        [[name, *(fmt_number(v[split][m], 4) for split in ("valid", "test") for m in ("hr@10", "mrr"))]
         for name, v in probe.items()]) if probe else ""
    chance = next(iter(probe.values()))["test"]["chance_hr@10"] if probe else None
    report = (
        "# distillrec quickstart: the demo shop\n\n"
        f"Dataset: {dataset.statistics()}\n\n"
        "Full ranking over all items, pessimistic ties, history not masked, best-validation epoch tested. "
        "Paired tests are against the first row (Pop), per test user.\n\n" + table +
        "\n`*_tpad`: item features = TPAD embeddings (`<IMG_SUM>`/`<TEXT_SUM>` states of the final Knowledge tower); "
        "`dimo_raw`: DIMO on the raw encoder features (EfficientNet-Lite0 image, MiniLM text); `fused_sasrec`: "
        "SASRec with the shop's attribute one-hot.\n\n"
        "## TPAD\n\nKeyword generation rate (GR) on held-out items, per prompt modality (knowledge epoch 0: before "
        "training; align = stage 2b):\n\n"
        + gr + "\n\n"
        + ("Transition probe: next-item retrieval from each item representation alone (the last item of a held-out "
           "history ranks every item by cosine, columns standardised); chance HR@10 = "
           f"{fmt_number(chance, 4)}. It says whether TPAD's transition signal reaches what it exports.\n\n"
           + probe_md + "\n\n" if probe else "")
        + f"TPAD report: `tpad/report.md`; time (s): {json.dumps(tpad_report['seconds'])}.\n\n"
        + (f"![TPAD training curves]({curves.name})\n\n" if curves else "")
        + (f"![DIMO ID vs modality item tables, PCA]({pca.name})\n\n" if pca else "")
        + "Each run's own report (slices, curves, timing): `<run>/report.md`.\n"
    )
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / README_RESULTS, readme_results(out, [name for name, *_ in runs]))
    console.print(table)
    console.print(f"report: {out / 'report.md'}  (total {elapsed()})")
    return out / "report.md"


# ------------------------------------------------------------------------------------------ the README's numbers
README_RESULTS = "readme_results.md"
README_HEADER = ["run", "test HR@10", "test NDCG@10", "Δ NDCG@10 vs Pop", "paired t p", "Wilcoxon p"]
README_LABELS = {
    "fused_sasrec": "fused_sasrec (+ attribute one-hot features)",
    "fused_sasrec_tpad": "fused_sasrec_tpad (+ TPAD embeddings)",
    "dimo_raw": "dimo_raw (DIMO + EfficientNet-Lite0 image, MiniLM text)",
    "dimo_tpad": "dimo_tpad (DIMO + TPAD embeddings)",
}


def _p_value(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.0e}"


def _short(x: float | None, digits: int) -> str:
    """``.156`` (no leading zero), ``0`` for zero: how the README's text quotes rates."""
    if x is None:
        return "–"
    return "0" if round(x, digits) == 0 else f"{x:.{digits}f}".replace("0.", ".", 1)


def readme_table(out: Path, names: list[str] | None = None, metric: str = "ndcg@10") -> str:
    """The README's quickstart table from the runs in ``out`` (default: every ``QUICKSTART_RUNS`` name), in the
    README's format: test HR@10 and NDCG@10 (mean ± 95% CI over seeds), the best NDCG@10 in bold, and paired tests
    of NDCG@10 against the first run (Pop) per test user, the per-user values averaged over seeds."""
    from .evaluation.metrics import metrics_from_ranks, paired_test
    from .runs import RunFolder

    names = names or [name for name, *_ in QUICKSTART_RUNS]
    k = int(metric.split("@")[1])
    folders = [RunFolder(out / n) for n in names]
    runs = [f.read_metrics() for f in folders]

    def per_row(folder: RunFolder, r: dict[str, Any]) -> np.ndarray:
        return np.mean([metrics_from_ranks(folder.read_ranks("test", s["seed"]), (k,))[metric] for s in r["seeds"]],
                       axis=0)

    base = per_row(folders[0], runs[0])
    best = max(r["test"][metric] for r in runs)
    rows = []
    for i, (name, folder, r) in enumerate(zip(names, folders, runs)):
        ci = r.get("test_ci95", {})
        ndcg = fmt_number(r["test"][metric], ci=ci.get(metric))
        row = [README_LABELS.get(name, name), fmt_number(r["test"][f"hr@{k}"], ci=ci.get(f"hr@{k}")),
               f"**{ndcg}**" if r["test"][metric] == best else ndcg]
        if i == 0:
            rows.append(row + ["–"] * 3)
            continue
        t = paired_test(per_row(folder, r), base, metric)
        rows.append(row + [f"{t.mean_diff:+.4f}".replace("-", "−"), _p_value(t.t_pvalue), _p_value(t.wilcoxon_pvalue)])
    return markdown_table(README_HEADER, rows)


def readme_tpad_numbers(tpad_report: dict[str, Any]) -> dict[str, str]:
    """The TPAD numbers the README's quickstart text quotes: the keyword generation rates (``gr``) and the
    transition probe (``probe``), each as the exact phrase the README uses."""
    stages = tpad_report.get("stages", {})
    know = {h["epoch"]: h for h in stages.get("knowledge", {}).get("history", [])}
    align = stages.get("align", {}).get("history", [])
    out: dict[str, str] = {}
    if know and align:
        first, trained, final = know[min(know)], know[max(know)], align[-1]
        out["gr"] = (f"both modalities {_short(first.get('gr_both'), 3)} → {_short(trained.get('gr_both'), 3)} after "
                     f"stage 1 → {_short(final.get('gr_both'), 3)} after stage 2b; image-only "
                     f"{_short(final.get('gr_image'), 3)}, text-only {_short(final.get('gr_text'), 3)}")
    probe = tpad_report.get("probe") or {}
    wanted = {"raw text_minilm": "MiniLM text", "transfer states": "Transfer states", "exported (final)": "TPAD export"}
    if all(n in probe for n in wanted):
        parts = ", ".join(f"{label} {_short(probe[n]['valid']['mrr'], 4)}" for n, label in wanted.items())
        chance = next(iter(probe.values()))["test"]["chance_hr@10"]
        out["probe"] = f"valid MRR {parts}; chance HR@10 {_short(chance, 4)}"
    return out


def readme_results(out: Path, names: list[str] | None = None) -> str:
    """``readme_results.md``: what the README's quickstart section shows, rendered from this quickstart folder."""
    text = "# The README's quickstart numbers, from this folder\n\n" + readme_table(out, names) + "\n"
    tpad_report = out / "tpad" / "report.json"
    if tpad_report.is_file():
        for key, phrase in readme_tpad_numbers(json.loads(tpad_report.read_text())).items():
            text += f"\n{key}: {phrase}\n"
    return text


def plot_tpad_curves(report: dict[str, Any], path: Path) -> Path | None:
    """One panel per TPAD stage: its losses every few steps."""
    stages = [(s, report["stages"][s].get("curve", [])) for s in ("knowledge", "transfer", "align")
              if s in report["stages"]]
    stages = [(s, c) for s, c in stages if c]
    if not stages:
        return None
    panels = [Panel([(k, [c["step"] for c in curve], [c.get(k) for c in curve])
                     for k in curve[0] if k not in ("step", "loss")], title=f"stage {name}", xlabel="step")
              for name, curve in stages]
    return plot_panels(panels, path, panel_size=(3.6, 3.0))


def plot_id_vs_modality(run_dir: Path, dataset: Any, path: Path) -> Path | None:
    """PCA (one projection for both) of a trained DIMO's propagated ID and modality item tables, coloured by the
    item's category: whether the two views carry different information is visible as different cluster shapes."""
    import torch

    from .serving.recommend import TrainedRecommender

    if not (run_dir / "config.yaml").is_file():
        return None
    rec = TrainedRecommender.from_run(run_dir)
    with torch.no_grad():
        id_t, mo_t = (t[1:].cpu().numpy() for t in rec.model.item_tables())
    both = np.concatenate([id_t / np.linalg.norm(id_t, axis=1).mean(), mo_t / np.linalg.norm(mo_t, axis=1).mean()])
    centred = both - both.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    n = len(id_t)
    cats = dataset.items.text.get("category") or ["item"] * n
    names = sorted(set(cats))
    colour = np.array([names.index(c) for c in cats])
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 3.8), sharex=True, sharey=True)
    for ax, part, title in ((axes[0], xy[:n], "ID view"), (axes[1], xy[n:], "modality view (TPAD)")):
        ax.scatter(part[:, 0], part[:, 1], c=colour, cmap="tab20", s=4)
        ax.set_title(title)
    fig.suptitle("DIMO item tables, joint PCA, coloured by category", fontsize=9)
    return save_figure(fig, path)
