"""TPAD -> DIMO against the baselines on a real dataset, with ablations (issues 4 and 10). Prints tables.

    python benchmarks/tpad_results.py --dataset amazon2018-scientific-mm --seeds 1 2 3 4 5 --workers 2
    python benchmarks/tpad_results.py --dataset amazon2018-scientific-text --seeds 1 2 3 4 5 --no-ablations
    python benchmarks/tpad_results.py --only na gamma1 cosine --baselines dimo sasrec --tpad-seeds 1 2

Issue 10 additions: the variants ``gamma1`` (gamma1 = gamma2 = 1) and ``cosine`` (InfoNCE on cosines instead of MINE,
D_T frozen); every two-tower variant also exports D_L(h) (``tpad_distilled``) and gets a ``dimo_tpad_dl*`` run on
[h; D_L(h)]; ``--tpad-seeds`` trains each variant with more TPAD seeds (pooled rows, CIs with TPAD's training noise);
the transition-probe table (every representation, paired against the best raw feature) follows the results.

What runs (each job a ``distillrec`` subprocess with one torch thread, ``--workers`` at a time; finished jobs are
reused, so a rerun after a kill continues):

* TPAD: ``configs/tpad/<short>.yaml`` (``short`` = the dataset name without ``amazon2018-`` / ``amazon2014-``), and its
  ablations:
  ``na`` (gamma1 = gamma2 = 0), ``no_club`` (gamma1 = 0), ``no_mine`` (gamma2 = 0), ``no_image``, ``no_text``,
  ``single`` (one tower), ``no_lt`` (no L^t). Variants that share finished stages with the full run start from a
  copy of them (the stage keys decide what is reusable; a stage whose key differs is trained again).
* Downstream, each with every seed: the dataset's own configs (``configs/<dataset>/{sasrec,gru4rec,srgnn,sknn,
  fused_sasrec,fused_gru4rec,dimo}.yaml`` where they exist; ``dimo`` and the fused models there use the shipped CLIP
  features on scientific-mm and MiniLM text features on scientific-text), and
  ``dimo`` on each TPAD variant's embeddings, and ``fused_sasrec`` + ``fused_gru4rec`` on the full run's (features
  ``tpad_image``, ``tpad_text``).

The table: validation NDCG@10 (the selection metric), test HR@10 and NDCG@10 (mean +- 95% CI over seeds), test
NDCG@10 on cold targets (targets seen at most 4 times in training), and paired tests (t and Wilcoxon, per test user,
metrics averaged over seeds) against the best non-TPAD model, chosen on validation NDCG@10, never on test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distillrec.data.loaders import load_dataset  # noqa: E402
from distillrec.evaluation.metrics import mean_ci, metrics_from_ranks, paired_test  # noqa: E402
from distillrec.evaluation.report import MISSING, fmt_number, markdown_table  # noqa: E402
from distillrec.runs import RunFolder  # noqa: E402
from jobs import run_jobs  # noqa: E402  (benchmarks/jobs.py)

# the longest job first, so that two workers finish close together
BASELINES = ["srgnn", "sknn", "gru4rec", "sasrec", "fused_sasrec", "fused_gru4rec", "dimo"]
ABLATIONS = {
    "na": ["align.gamma1=0", "align.gamma2=0"],
    "no_club": ["align.gamma1=0"],
    "no_mine": ["align.gamma2=0"],
    "no_image": ["use_image=false"],
    "no_text": ["use_text=false"],
    "single": ["towers=single"],
    "no_lt": ["text_view=null"],  # stage 1 without L^t (the text-view contrastive term)
    # issue 10: alignment that reaches the export
    "gamma1": ["align.gamma1=1", "align.gamma2=1"],
    "cosine": ["align.lower_bound=cosine_infonce", "align.freeze_dt=true"],
    # the seed's terms plus the neighbourhood distillation from the Transfer states straight into h
    "similarity": ["align.gamma3=1"],
}
# every two-tower variant also exports D_L(h) (feature tpad_distilled): it adds a tensor, the h features are the same
EXPORT_DL = ["align.export=h_dl"]
REUSE = ["knowledge/final", "knowledge/items.json", "transfer/final", "states"]
COLD_MAX = 4


def split_variant(name: str) -> tuple[str, int | None]:
    """``"na-s2"`` -> ``("na", 2)``; ``"na"`` -> ``("na", None)`` (the recipe's own seed)."""
    base, sep, seed = name.rpartition("-s")
    return (base, int(seed)) if sep and seed.isdigit() else (name, None)


def tpad_job(short: str, variant: str, out: Path, extra: list[str] = (), threads: int = 1) -> dict:
    """``extra``: ``--set`` overrides for every TPAD run (before the variant's own), e.g. the GPU script's sizes."""
    base, seed = split_variant(variant)
    suffix = "" if seed is None else f"-s{seed}"
    sets = [*extra, *ABLATIONS.get(base, []), *([] if base == "single" else EXPORT_DL)]
    sets += [] if seed is None else [f"seed={seed}"]
    cmd = ["distillrec", "tpad", str(ROOT / "configs" / "tpad" / f"{short}.yaml"), "--out", str(out / "tpad" / variant),
           "--set", f"num_threads={threads}", "--set", "progress=false"]
    for s in sets:
        cmd += ["--set", s]
    return {"name": f"tpad_{variant}", "cmd": cmd, "done": out / "tpad" / variant / "embeddings" /
            "item_embeddings.safetensors", "deps": [] if base in ("full", "no_image", "no_text") else
            [f"tpad_full{suffix}"], "variant": variant, "reuse_from": f"full{suffix}"}


def train_job(name: str, config: Path, out: Path, seeds: list[int], sets: list[str], deps: list[str],
              threads: int = 1) -> dict:
    cmd = ["distillrec", "train", str(config), "--out", str(out / "runs" / name), "--resume",
           "--set", f"train.seeds={json.dumps(seeds)}", "--set", f"train.num_threads={threads}",
           "--set", "train.progress=false"]
    for s in sets:
        cmd += ["--set", s]
    return {"name": name, "cmd": cmd, "done": out / "runs" / name / "metrics.json", "deps": deps}


def copy_reusable(out: Path, variant: str, source: str = "full") -> None:
    src, dst = out / "tpad" / source, out / "tpad" / variant
    for rel in REUSE:
        if (src / rel).exists() and not (dst / rel).exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (src / rel).is_dir() else shutil.copy2)(src / rel, dst / rel)


def probe_table(out: Path, variants: list[str], dataset: str) -> str:
    """The transition probe of the raw features, the Transfer states, the stage-1 Knowledge embedding and each
    variant's exports (from their reports), with paired tests of each export against the best raw feature on the
    test transitions (reciprocal rank per transition)."""
    from safetensors.numpy import load_file

    from distillrec.evaluation.probe import held_out_transitions, transition_probe
    from distillrec.features.cache import item_feature_matrix

    reports = {v: json.loads((out / "tpad" / v / "report.json").read_text()) for v in variants
               if (out / "tpad" / v / "report.json").is_file()}
    if not reports or "probe" not in next(iter(reports.values())):
        return ""
    ds = load_dataset({"name": dataset})
    src, dst = held_out_transitions(ds.test)
    first = reports.get("full") or next(iter(reports.values()))
    rows, rr = [], {}
    # the raw features the run probed; the bundled encoders' ones (MiniLM over the recipe's text fields) from the
    # feature cache, as TPAD's data step made them
    raw = {n: item_feature_matrix(n.removeprefix("raw "), ds.items, False, text_fields=first["config"]["text_fields"])
           for n in first["probe"] if n.startswith("raw ") and n != "raw both"}
    for n, m in raw.items():
        rr[n] = transition_probe(m, src, dst)["per_row_rr"]
    best_raw = max(rr, key=lambda n: first["probe"][n]["valid"]["mrr"]) if rr else None
    first_dir = out / "tpad" / ("full" if "full" in reports else next(iter(reports)))
    states = {"transfer states": "transfer", "knowledge after stage 1": "knowledge_stage1"}
    for name, v in first["probe"].items():
        if name.startswith("exported"):
            continue
        row = [name, "–", *(fmt_number(v[sp][m], 4) for sp in ("valid", "test") for m in ("hr@10", "mrr"))]
        path = first_dir / "states" / f"{states.get(name, '-')}.safetensors"
        if best_raw is not None and path.is_file():
            t = paired_test(transition_probe(load_file(str(path))["states"], src, dst)["per_row_rr"], rr[best_raw],
                            "mrr")
            row[1] = f"{t.mean_diff:+.4f} (t p {t.t_pvalue:.2g}, W p {t.wilcoxon_pvalue:.2g})"
        rows.append(row)
    for variant, r in reports.items():
        emb = load_file(str(out / "tpad" / variant / "embeddings" / "item_embeddings.safetensors"))
        mats = {"exported (final)": np.concatenate([emb["image"], emb["text"]], 1)}
        if "distilled" in emb:
            mats["exported D_L(h)"] = emb["distilled"]
        for name, m in mats.items():
            v = r["probe"][name]
            row = [f"{variant}: {name}", "", *(fmt_number(v[sp][k], 4) for sp in ("valid", "test")
                                               for k in ("hr@10", "mrr"))]
            if best_raw is not None:
                t = paired_test(transition_probe(m, src, dst)["per_row_rr"], rr[best_raw], "mrr")
                row[1] = f"{t.mean_diff:+.4f} (t p {t.t_pvalue:.2g}, W p {t.wilcoxon_pvalue:.2g})"
            rows.append(row)
    chance = first["probe"][next(iter(first["probe"]))]["test"]["chance_hr@10"]
    return "\n".join([
        "## Transition probe", "",
        "Next-item retrieval from each item representation alone (the last item of a held-out history ranks the whole "
        f"catalogue by cosine, columns standardised); chance HR@10 = {fmt_number(chance, 4)}. Δ: test MRR against "
        f"the best raw feature on validation ({best_raw}), paired over test transitions.", "",
        markdown_table(["representation", "Δ test MRR vs best raw", "valid HR@10", "valid MRR", "test HR@10",
                        "test MRR"], rows), ""])


def mi_table(out: Path, variants: list[str]) -> str:
    """MINE / vCLUB between the Transfer states and each variant's representations, from estimators fitted afresh
    (the report's ``mi_to_transfer``, computed here for runs made without ``probe_mi``)."""
    from distillrec.methods.tpad.pipeline import mi_to_transfer

    rows = []
    for v in variants:
        path = out / "tpad" / v / "report.json"
        if not path.is_file():
            continue
        mi = json.loads(path.read_text()).get("mi_to_transfer") or mi_to_transfer(out / "tpad" / v)
        for name, e in mi.items():
            if name == "knowledge after stage 1" and rows and rows[0][0].endswith(name):
                continue  # the same stage 1 in every variant that reuses it
            rows.append([f"{v}: {name}", *(fmt_number(e[k], 3) for k in ("mine_heldout", "mine_shuffled_heldout",
                                                                        "club_heldout", "club_shuffled_heldout"))])
    if not rows:
        return ""
    return "\n".join(["", "## What the export holds of the Transfer states", "",
                      "MINE (lower) and vCLUB (upper) estimates of I(representation; Transfer states), estimators "
                      "fitted afresh (32 principal components a side, fitted on 80% of the items, read on 20%), "
                      "beside the same on shuffled pairs.", "",
                      markdown_table(["representation", "MINE", "MINE shuffled", "vCLUB", "vCLUB shuffled"], rows),
                      ""])


def per_user(run_dir: Path, metric: str) -> np.ndarray:
    f = RunFolder(run_dir)
    seeds = [s["seed"] for s in f.read_metrics()["seeds"]]
    return np.mean([metrics_from_ranks(f.read_ranks("test", s), (10,))[metric] for s in seeds], 0)


def table(out: Path, names: list[str], dataset: str) -> str:
    ds = load_dataset({"name": dataset})
    counts = np.zeros(ds.n_items + 1, dtype=np.int64)
    for seq in ds.train:
        np.add.at(counts, seq, 1)
    cold = counts[np.asarray(ds.test.targets)] <= COLD_MAX
    runs = {n: RunFolder(out / "runs" / n).read_metrics() for n in names}
    valid = {n: runs[n]["valid"]["ndcg@10"] for n in names}
    best = max((n for n in names if "tpad" not in n), key=lambda n: valid[n])
    base = per_user(out / "runs" / best, "ndcg@10")
    pm = lambda m: f"{fmt_number(m['mean'])} ± {fmt_number(m['ci95'])}"  # noqa: E731
    rows = []
    for n in names:
        r = runs[n]
        per_seed = [s for s in r["seeds"]]
        ndcg = mean_ci([s["test"]["ndcg@10"] for s in per_seed])
        hr = mean_ci([s["test"]["hr@10"] for s in per_seed])
        a = per_user(out / "runs" / n, "ndcg@10")
        folder = RunFolder(out / "runs" / n)
        cold_seeds = [metrics_from_ranks(folder.read_ranks("test", s["seed"]), (10,))["ndcg@10"][cold].mean()
                      for s in per_seed]
        c = mean_ci(cold_seeds)
        row = [n, len(per_seed), fmt_number(valid[n]), pm(hr), pm(ndcg), pm(c)]
        if n == best:
            rows.append(row + [MISSING] * 5)
            continue
        t = paired_test(a, base)
        tc = paired_test(a[cold], base[cold])
        rows.append(row + [f"{t.mean_diff:+.4f}", f"{t.t_pvalue:.3g}", f"{t.wilcoxon_pvalue:.3g}",
                           f"{tc.mean_diff:+.4f}", f"{tc.t_pvalue:.3g}"])
    pairs = []
    for n in names:
        raw = n.split("_tpad")[0]
        if "_tpad" not in n or raw not in runs:
            continue
        a, b = per_user(out / "runs" / n, "ndcg@10"), per_user(out / "runs" / raw, "ndcg@10")
        t, tc = paired_test(a, b), paired_test(a[cold], b[cold])
        pairs.append([n, raw, f"{t.mean_diff:+.4f}", f"{t.t_pvalue:.3g}", f"{t.wilcoxon_pvalue:.3g}",
                      f"{tc.mean_diff:+.4f}", f"{tc.t_pvalue:.3g}"])
    return "\n".join([
        f"Best non-TPAD model on validation NDCG@10: **{best}**. Cold targets: {int(cold.sum())} of {len(cold)} "
        f"test users (target seen <= {COLD_MAX} times in training).", "",
        markdown_table(["run", "seeds", "valid NDCG@10", "test HR@10", "test NDCG@10", "cold NDCG@10", "Δ vs best",
                        "p (t)", "p (Wilcoxon)", "Δ cold", "p cold (t)"], rows), "",
        "Each TPAD run against the same model on the dataset's own features (paired, per test user):", "",
        markdown_table(["run", "vs", "Δ test NDCG@10", "p (t)", "p (Wilcoxon)", "Δ cold", "p cold (t)"], pairs),
    ]) + "\n"


def pooled_table(out: Path, groups: dict[str, list[str]]) -> str:
    """Runs pooled over TPAD training seeds: mean ± CI over every (TPAD seed, downstream seed) pair, so the interval
    includes TPAD's own training noise; paired test against the same model on the dataset's own features, per test
    user, averaged over all the pooled runs."""
    if not groups:
        return ""
    rows = []
    for group, names in groups.items():
        per_seed = [s["test"]["ndcg@10"] for n in names for s in RunFolder(out / "runs" / n).read_metrics()["seeds"]]
        m = mean_ci(per_seed)
        row = [group, f"{len(names)} × {len(per_seed) // len(names)}",
               f"{fmt_number(m['mean'])} ± {fmt_number(m['ci95'])}"]
        raw = group.split("_tpad")[0]
        if (out / "runs" / raw / "metrics.json").is_file():
            a = np.mean([per_user(out / "runs" / n, "ndcg@10") for n in names], 0)
            t = paired_test(a, per_user(out / "runs" / raw, "ndcg@10"))
            row += [raw, f"{t.mean_diff:+.4f}", f"{t.t_pvalue:.3g}", f"{t.wilcoxon_pvalue:.3g}"]
        else:
            row += [MISSING] * 4
        rows.append(row)
    return "\n" + "\n".join([
        "Pooled over TPAD training seeds (TPAD seeds × downstream seeds):", "",
        markdown_table(["run", "runs", "test NDCG@10", "vs", "Δ", "p (t)", "p (Wilcoxon)"], rows)]) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="amazon2018-scientific-mm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="variants to run (default: full + all ablations)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--baselines", nargs="*", default=None, help=f"baseline models (default: {' '.join(BASELINES)})")
    ap.add_argument("--results-name", default=None, help="benchmarks/results/<name>.md (default tpad_<dataset>)")
    ap.add_argument("--tpad-seeds", type=int, nargs="*", default=[],
                    help="extra TPAD training seeds for every variant (the recipe's seed always runs); downstream "
                         "runs on each, and pooled rows whose CIs include TPAD's own training noise")
    ap.add_argument("--seeded-variants", nargs="*", default=["full", "na"],
                    help="the variants that get the --tpad-seeds (default: full na, the issue-10 main variant and "
                         "TPAD-NA; the other ablations keep the recipe's one TPAD seed)")
    ap.add_argument("--seeded-dimo-only", action="store_true",
                    help="the extra TPAD seeds feed DIMO on h only (not fused SASRec/GRU4Rec, not D_L(h))")
    ap.add_argument("--tpad-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a --set override for every TPAD run (repeatable), e.g. autocast=bf16, device=cuda")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a --set override for every downstream run (repeatable), e.g. train.device=cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    ap.add_argument("--fused", nargs="*", default=["fused_sasrec", "fused_gru4rec"],
                    help="the fused models trained on the full variant's embeddings (default: fused_sasrec "
                         "fused_gru4rec)")
    ap.add_argument("--no-dl", action="store_true", help="no dimo_tpad_dl* runs (DIMO on [h; D_L(h)])")
    ap.add_argument("--no-downstream", action="store_true",
                    help="train the TPAD variants and print their probe table only: no baseline or DIMO runs (for a "
                         "dataset whose downstream runs do not fit the machine; the README says which)")
    ap.add_argument("--probe-only", action="store_true",
                    help="run nothing: print the transition-probe table of the finished TPAD runs <out>/tpad/<variant> "
                         "named by --only")
    args = ap.parse_args(argv)
    short = args.dataset.removeprefix("amazon2018-").removeprefix("amazon2014-")
    out = args.out or ROOT / "runs" / "results" / short
    if args.probe_only:
        text = probe_table(out, args.only or ["full"], args.dataset) + mi_table(out, args.only or ["full"])
        print(text or f"no finished TPAD run with a probe under {out / 'tpad'}")
        return text
    out.mkdir(parents=True, exist_ok=True)
    variants = ["full"] + ([] if args.no_ablations else list(ABLATIONS))
    if args.only is not None:
        variants = ["full"] + [v for v in args.only if v != "full"]
    variants = [v + suffix for v in variants
                for suffix in ["", *(f"-s{t}" for t in (args.tpad_seeds if v in args.seeded_variants else []))]]
    jobs = [tpad_job(short, v, out, args.tpad_set, args.threads) for v in variants]
    names = []
    cfg_dir = ROOT / "configs" / args.dataset
    for b in ([] if args.no_downstream else BASELINES if args.baselines is None else args.baselines):
        if (cfg_dir / f"{b}.yaml").is_file():
            jobs.append(train_job(b, cfg_dir / f"{b}.yaml", out, args.seeds, args.train_set, [], args.threads))
            names.append(b)
    groups: dict[str, list[str]] = {}  # run name without the TPAD seed -> its runs over TPAD seeds
    for v in variants:
        base, seed = split_variant(v)
        suffix = "" if seed is None else f"-s{seed}"
        emb = out / "tpad" / v / "embeddings"
        sets = [f"dataset.embeddings={json.dumps({'tpad': str(emb)})}", "model.params.features=[tpad_image,tpad_text]"]
        runs = [(m, f"{m}_tpad" + ("" if base == "full" else f"_{base}"), sets[1:])
                for m in (["dimo", *args.fused] if base == "full" and not (
                    seed is not None and args.seeded_dimo_only) else ["dimo"])]
        if base != "single" and not args.no_dl and not (seed is not None and args.seeded_dimo_only):  # on D_L(h)
            runs.append(("dimo", "dimo_tpad_dl" + ("" if base == "full" else f"_{base}"),
                         ["model.params.features=[tpad_image,tpad_text,tpad_distilled]"]))
        for model, name, feats in ([] if args.no_downstream else runs):
            if (cfg_dir / f"{model}.yaml").is_file():
                jobs.append(train_job(name + suffix, cfg_dir / f"{model}.yaml", out, args.seeds,
                                      [*args.train_set, sets[0], *feats], [f"tpad_{v}"], args.threads))
                names.append(name + suffix)
                groups.setdefault(name, []).append(name + suffix)
    run_jobs(jobs, args.workers, out, threads=args.threads,
             before_start=lambda j: copy_reusable(out, j["variant"], j["reuse_from"])
             if j.get("variant") and j["deps"] else None)
    command = " ".join(argv if argv is not None else sys.argv[1:]).replace(f"{ROOT}/", "")  # no machine paths
    text = (f"# TPAD results: {args.dataset}\n\nCommand: `python benchmarks/tpad_results.py {command}`\n\n" + (table(out, names, args.dataset) if names else "")
            + pooled_table(out, {g: r for g, r in groups.items() if len(r) > 1})
            + "\n" + probe_table(out, variants, args.dataset) + mi_table(out, variants))
    tpad_times = {v: json.loads((out / "tpad" / v / "report.json").read_text())["seconds"]["total"] for v in variants
                  if (out / "tpad" / v / "report.json").is_file()}
    text += (f"\nTPAD wall time per variant (s, {args.threads} torch thread(s) per job, {args.workers} jobs at a time): "
             + json.dumps(tpad_times) + "\n")
    res = ROOT / "benchmarks" / "results"
    res.mkdir(exist_ok=True)
    (res / f"{args.results_name or 'tpad_' + short}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
