"""MLLM-MSR, its ablations and the baselines on the same sampled candidates (issue 11). Prints tables.

    python benchmarks/mllm_msr_results.py --dataset amazon2018-scientific-mm --seeds 0 1 2 \\
        --baselines sasrec gru4rec dimo dimo_tpad --baseline-dir runs/results10/scientific-mm/runs
    python benchmarks/mllm_msr_results.py --dataset microlens-50k --seeds 0 1 2 --baselines sasrec gru4rec
    python benchmarks/mllm_msr_results.py ... --speed   # also the quality-and-speed table (run it alone: it times)

What runs (each job a ``distillrec`` subprocess with one torch thread, ``--workers`` at a time; finished jobs are
reused, so a rerun after a kill continues):

* MLLM-MSR: ``configs/mllm_msr/<short>.yaml`` with every ``--seeds`` seed (the seed draws the training users, the
  ranked users and their candidates, and initialises LoRA), and the ablations ``direct`` (one prompt over the whole
  history: MLLM-MSR_R), ``no_image`` (no image summaries: MLLM-MSR_I; not on a dataset without images), ``block1``
  and ``block5`` (block size). All share one summary cache (``<out>/summaries``).
* Baselines: a run folder ``<baseline-dir>/<name>`` when it exists (e.g. the TPAD results' ``sasrec``, ``dimo``,
  ``dimo_tpad``), else ``distillrec train configs/<dataset>/<name>.yaml`` with ``--baseline-seeds``. The main variant
  scores every baseline on its candidates (each baseline seed) and re-ranks the first baseline's top-20.

Table: test metrics on the sampled candidates, mean ± 95% CI over the MLLM-MSR seeds (each seed its own users and
candidates; a baseline's value per seed is the mean over its training seeds); validation AUC (the selection metric);
cold targets (seen at most 4 times in training); paired tests of MLLM-MSR against each baseline over all ranked users
of all seeds (t and Wilcoxon; a baseline's per-user metric is its mean over training seeds).
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distillrec.evaluation.candidates import CandidateSet, per_row_candidate_metrics  # noqa: E402
from distillrec.evaluation.metrics import mean_ci, paired_test  # noqa: E402
from distillrec.evaluation.report import fmt_number, markdown_table  # noqa: E402
from distillrec.runs import score_run_on_candidates  # noqa: E402
from jobs import run_jobs  # noqa: E402  (benchmarks/jobs.py)

VARIANTS = {
    "main": [],
    "direct": ["preference=direct"],
    "no_image": ["image_summary=false"],
    "block1": ["block_size=1"],
    "block5": ["block_size=5"],
}
METRICS = ("auc", "hr@1", "hr@5", "hr@10", "mrr@5", "ndcg@5")
COLD_MAX = 4


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def short_name(dataset: str) -> str:
    return {"amazon2018-scientific-mm": "scientific-mm", "microlens-50k": "microlens"}.get(dataset, dataset)


def msr_job(short: str, variant: str, seed: int, out: Path, extra: list[str], deps: list[str]) -> dict:
    folder = out / f"{variant}-s{seed}"
    cmd = ["distillrec", "method", "mllm_msr", str(ROOT / "configs" / "mllm_msr" / f"{short}.yaml"), "--out",
           str(folder), "--set", f"seed={seed}", "--set", "num_threads=1", "--set", "progress=false",
           "--set", f"summary_dir={out / 'summaries'}"]
    for s in VARIANTS[variant] + extra:
        cmd += ["--set", s]
    return {"name": f"{variant}-s{seed}", "cmd": cmd, "done": folder / "report.json", "deps": deps}


def train_job(name: str, config: Path, folder: Path, seeds: list[int], sets: list[str] = ()) -> dict:
    cmd = ["distillrec", "train", str(config), "--out", str(folder), "--set", f"train.seeds={json.dumps(seeds)}",
           "--set", "train.num_threads=1", "--set", "train.progress=false"]
    for s in sets:
        cmd += ["--set", s]
    return {"name": name, "cmd": cmd, "done": folder / "metrics.json", "deps": []}


def load_scores(folder: Path, name: str) -> np.ndarray:
    from safetensors.torch import load_file

    return load_file(str(folder / "scores" / f"{name}.safetensors"))["scores"].numpy()


def results_table(out: Path, variants: list[str], seeds: list[int], baselines: dict[str, Path],
                  ablation_seeds: list[int]) -> str:
    from distillrec.data.loaders import load_dataset
    from distillrec.methods.mllm_msr.summaries import SummaryCache

    seeds_of = {v: seeds if v == "main" else ablation_seeds for v in variants}
    reports = {(v, s): json.loads((out / f"{v}-s{s}" / "report.json").read_text()) for v in variants
               for s in seeds_of[v]}
    ds = load_dataset(reports[(variants[0], seeds[0])]["config"]["dataset"])
    counts = ds.item_train_counts()
    rows, per_user = [], {}
    for v in variants:
        vs = seeds_of[v]
        per_seed = [reports[(v, s)]["metrics"]["test"] for s in vs]
        valid = [reports[(v, s)]["metrics"]["valid"]["auc"] for s in vs]
        cold = [reports[(v, s)]["metrics"]["test"].get("cold", {}).get("hr@5") for s in vs]
        rows.append([(f"MLLM-MSR {v}" if v != "main" else "MLLM-MSR") + f" ({plural(len(vs), 'seed')})", fmt_number(mean_ci(valid)["mean"], 4,
                                                                               mean_ci(valid)["ci95"]),
                     *(fmt_number(mean_ci([m[k] for m in per_seed])["mean"], 4,
                                  mean_ci([m[k] for m in per_seed])["ci95"]) for k in METRICS),
                     fmt_number(mean_ci([c for c in cold if c is not None])["mean"], 4) if any(
                         c is not None for c in cold) else "–"])
        per_user[v] = {s: per_row_candidate_metrics(load_scores(out / f"{v}-s{s}", "test")) for s in vs}
    zs = [reports[("main", s)]["metrics"].get("zero_shot_test") for s in seeds]
    if all(zs):
        rows.append(["LM without SFT (zero-shot)", "–", *(fmt_number(mean_ci([m[k] for m in zs])["mean"], 4,
                                                                      mean_ci([m[k] for m in zs])["ci95"])
                                                         for k in METRICS), "–"])
    paired_rows = []
    for name, run in baselines.items():
        seed_means, users, cold_means = [], {k: [] for k in METRICS}, []
        for s in seeds:
            cands = CandidateSet.load(out / f"main-s{s}" / "candidates" / "test.safetensors")
            rc = json.loads((run / "metrics.json").read_text())
            run_seeds = [p["seed"] for p in rc["seeds"]] if "seeds" in rc else None
            per = [per_row_candidate_metrics(score_run_on_candidates(run, cands, seed=t))
                   for t in (run_seeds or [None])]
            avg = {k: np.mean([p[k] for p in per], 0) for k in METRICS}
            seed_means.append({k: float(avg[k].mean()) for k in METRICS})
            cold_rows = counts[cands.items[:, 0]] <= COLD_MAX
            if cold_rows.any():
                cold_means.append(float(avg["hr@5"][cold_rows].mean()))
            for k in METRICS:
                users[k].append(avg[k])
        users = {k: np.concatenate(v) for k, v in users.items()}
        rows.append([f"{name} ({plural(len(per), 'training seed')})", "–",
                     *(fmt_number(mean_ci([m[k] for m in seed_means])["mean"], 4,
                                  mean_ci([m[k] for m in seed_means])["ci95"]) for k in METRICS),
                     fmt_number(float(np.mean(cold_means)), 4) if cold_means else "–"])
        main_users = {k: np.concatenate([per_user["main"][s][k] for s in seeds]) for k in METRICS}
        for k in ("auc", "hr@5", "mrr@5"):
            t = paired_test(main_users[k], users[k], k)
            paired_rows.append([name, k, fmt_number(t.mean_a, 4), fmt_number(t.mean_b, 4),
                                fmt_number(t.mean_diff, 4), f"{t.t_pvalue:.2g}", f"{t.wilcoxon_pvalue:.2g}"])
    for v in variants[1:]:
        common = [s for s in seeds_of[v] if s in seeds]
        for k in ("auc", "hr@5"):
            a = np.concatenate([per_user[v][s][k] for s in common])
            b = np.concatenate([per_user["main"][s][k] for s in common])
            t = paired_test(a, b, k)
            paired_rows.append([f"MLLM-MSR {v} vs main (seeds {common})", k, fmt_number(t.mean_a, 4), fmt_number(t.mean_b, 4),
                                fmt_number(t.mean_diff, 4), f"{t.t_pvalue:.2g}", f"{t.wilcoxon_pvalue:.2g}"])
    r0 = reports[("main", seeds[0])]
    n_users = r0["n_eval_users"]
    text = (f"Sampled protocol (not full ranking): per MLLM-MSR seed, {n_users} users drawn by seed, each test "
            f"target + {r0['protocol']['n_negatives']} never-interacted items; {plural(len(seeds), 'seed')} "
            f"({len(seeds) * n_users} ranked users in all). AUC per user (ties 1/2). ± = 95% t-interval over the "
            f"MLLM-MSR seeds (with {plural(len(seeds), 'seed')} it is wide: it holds the spread of the users and candidates drawn).\n\n"
            + markdown_table(["model", "valid auc", *(f"test {k}" for k in METRICS), "cold hr@5"], rows)
            + "\n\nPaired tests over all ranked users of all seeds (first − second):\n\n"
            + markdown_table(["against", "metric", "MLLM-MSR", "other", "diff", "t p", "Wilcoxon p"], paired_rows)
            + "\n")
    rr = [reports[("main", s)].get("rerank") for s in seeds]
    if all(rr):
        ks = ("hr@10", "ndcg@10")
        text += (f"\nRe-ranking {rr[0]['model']}'s top-{rr[0]['top_n']} inside full ranking (test users of each "
                 "seed; mean ± CI over seeds):\n\n" + markdown_table(
                     ["", *ks], [[lab, *(fmt_number(mean_ci([r[key][k] for r in rr])["mean"], 4,
                                                    mean_ci([r[key][k] for r in rr])["ci95"]) for k in ks)]
                                 for lab, key in (("base", "base"), ("re-ranked by MLLM-MSR", "reranked"))]) + "\n")
    cost = r0["cost"]
    text += "\nCost of seed " + str(seeds[0]) + " (main variant; one torch thread, other jobs sharing the 2 cores): " \
            + json.dumps({k: v for k, v in cost.items()}) + "\n"
    sft = r0.get("recommender") or {}
    if sft.get("seconds") is not None:
        text += (f"\nLoRA yes/no SFT of seed {seeds[0]} (main variant): {sft['seconds']:.1f} s, {sft.get('steps')} "
                 f"steps, {sft.get('trainable_parameters')} trainable parameters\n")
    for name, label in (("items", "image summaries"), ("preferences", "preference summaries")):
        texts = SummaryCache(out / "summaries", name).texts.values()
        if texts:  # how much the summaries can tell items or users apart
            top, n_top = Counter(texts).most_common(1)[0]
            text += (f"\nDistinct {label} in the shared cache (every variant and seed): {len(set(texts))} of "
                     f"{len(texts)}; the most common ({n_top}×): \"{top}\"\n")
    text += ("\nWall time per run (s, the run's report; one torch thread, other jobs sharing the cores): "
             + json.dumps({f"{v}-s{s}": r["seconds"]["total"] for (v, s), r in reports.items()}) + "\n")
    return text


def speed_table(out: Path, seed: int, tpad_run: Path | None, n_users: int) -> str:
    """Online cost per ranked user, timed here alone with one torch thread: MLLM-MSR writes the user's preference
    summary from its history (no cache: a new history) and scores the 21 candidates (prefix key/value cache); a
    recommender on TPAD embeddings scores the same 21 candidates (TPAD's embeddings are computed once, offline)."""
    import shutil

    import torch

    from distillrec.data.loaders import load_dataset
    from distillrec.evaluation.candidates import candidate_metrics, score_candidates
    from distillrec.methods.mllm_msr import pipeline as msr
    from distillrec.methods.mllm_msr.config import load_mllm_msr_config
    from distillrec.methods.mllm_msr.data import MSRData
    from distillrec.methods.mllm_msr.summaries import SummaryCache, image_key, preference_summaries, summary_key
    from distillrec.runs import load_trained

    torch.set_num_threads(1)
    folder = out / f"main-s{seed}"
    rep = json.loads((folder / "report.json").read_text())
    cfg = load_mllm_msr_config(rep["config"]).model_copy(update={"progress": False})
    ds = load_dataset(cfg.dataset)
    data = MSRData(cfg, ds)
    cands = CandidateSet.load(folder / "candidates" / "test.safetensors", ds)
    sub = CandidateSet(cands.split, cands.rows[:n_users], cands.items[:n_users], cands.seed, cands.n_negatives,
                       cands.dataset_fingerprint)
    hist = [data.history(ds.test.histories[r]) for r in sub.rows]
    summariser = msr.build_model(cfg, data.d_image, summariser=True)
    if cfg.summarises_images:  # item image summaries are per item, written once: taken from the run's cache
        items = sorted({i for h in hist for i in h if data.has_image[i]})
        img, _ = data.images(items)
        cache = SummaryCache(out / "summaries", "items")
        model_id = msr.lm_model_id(cfg, summariser, True)
        data.image_summaries = {i: cache[k] for n, i in enumerate(items) if (k := summary_key(
            model_id, cfg.image_summary_prompt, cfg.image_summary_tokens, image_key(ds.items.ids[i - 1], img[n])))
            in cache}
    tmp = out / "speed_cache"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    prefs, calls = preference_summaries(
        summariser, SummaryCache(tmp, "p"), hist, data.item_line, "speed", mode=cfg.preference,
        block_size=cfg.block_size, first_block=cfg.first_block_prompt, next_block=cfg.next_block_prompt,
        max_new_tokens=cfg.preference_tokens, batch_size=1)
    t_pref = (time.perf_counter() - t0) / len(hist)
    shutil.rmtree(tmp, ignore_errors=True)
    del summariser
    mm = msr.build_model(cfg, data.d_image)
    mm.load_trainable(folder / "recommender" / "final")
    t0 = time.perf_counter()
    s = msr.score_rows(mm, data, prefs, sub.items, cfg, adapter="recommender")
    t_score = (time.perf_counter() - t0) / len(hist)
    lines = [["MLLM-MSR (recurrent preference summary + 21 yes/no scores, prefix cache)", fmt_number(t_pref, 3),
              fmt_number(t_score, 3), fmt_number(t_pref + t_score, 3), fmt_number(candidate_metrics(s)["auc"], 4)]]
    if tpad_run is not None:
        trained = load_trained(tpad_run)
        t0 = time.perf_counter()
        sc = score_candidates(trained.model, trained.dataset.test, sub, trained.config.train.max_len, batch_size=1)
        t_rec = (time.perf_counter() - t0) / len(hist)
        lines.append([f"{trained.config.model.name} on TPAD embeddings (`{tpad_run.name}`, seed {trained.seed})",
                      "0", fmt_number(t_rec, 5), fmt_number(t_rec, 5), fmt_number(candidate_metrics(sc)["auc"], 4)])
    load = os.getloadavg()[0]
    return (f"\nOnline cost per ranked user ({len(hist)} test users of seed {seed}, 21 candidates each, one user at a "
            f"time, one torch thread; 1-min load average {load:.1f} on 2 cores when it finished):\n\n" + markdown_table(
                ["model", "preference s/user", "scoring s/user", "total s/user", f"auc ({len(hist)} users)"], lines)
            + f"\n\nMLLM-MSR's LLM calls per user for the preference summary: {np.mean(calls):.2f}.\n")


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="amazon2018-scientific-mm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=None,
                    help="the seeds of the variants other than main (default: --seeds)")
    ap.add_argument("--baselines", nargs="*", default=["sasrec", "gru4rec"])
    ap.add_argument("--baseline-dir", type=Path, default=None, help="where finished baseline run folders are")
    ap.add_argument("--baseline-seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a --set override for every baseline trained here (repeatable), e.g. train.epochs=12")
    ap.add_argument("--rerank", default=None, help="the baseline whose top-20 MLLM-MSR re-ranks (default: the first)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--speed", action="store_true", help="also time the online cost per user (run alone)")
    ap.add_argument("--speed-users", type=int, default=20)
    ap.add_argument("--tpad-run", type=Path, default=None, help="the TPAD-embedding run of the speed table")
    ap.add_argument("--set", action="append", default=[], help="extra --set for every MLLM-MSR job")
    ap.add_argument("--results-name", default=None,
                    help="the output file's name, benchmarks/results/<name>.md (default mllm_msr_<short>)")
    args = ap.parse_args(argv)
    short = short_name(args.dataset)
    out = args.out or ROOT / "runs" / "mllm_msr_results" / short
    out.mkdir(parents=True, exist_ok=True)
    jobs, baselines = [], {}
    for b in args.baselines:
        given = args.baseline_dir / b if args.baseline_dir else None
        if given is not None and (given / "metrics.json").is_file():
            baselines[b] = given
            continue
        cfg = ROOT / "configs" / args.dataset / f"{b}.yaml"
        if not cfg.is_file():
            raise SystemExit(f"baseline {b}: no finished run in {args.baseline_dir} and no {cfg}")
        baselines[b] = out / "runs" / b
        jobs.append(train_job(b, cfg, baselines[b], args.baseline_seeds, args.baseline_set))
    variants = [v for v in args.variants if v in VARIANTS]
    if short == "microlens":
        variants = [v for v in variants if v != "no_image"]  # titles only: nothing to leave out
    rerank = args.rerank or (args.baselines[0] if args.baselines else None)
    main_extra = [f"baselines={json.dumps([str(p) for p in baselines.values()])}"]
    if rerank:
        main_extra.append(f"rerank={baselines[rerank]}")
    deps = [j["name"] for j in jobs]
    ablation_seeds = args.ablation_seeds or args.seeds
    for v in variants:  # the main variant of every seed first (the summary cache is shared)
        for s in (args.seeds if v == "main" else ablation_seeds):
            jobs.append(msr_job(short, v, s, out, args.set + (main_extra if v == "main" else []), deps))
    run_jobs(jobs, args.workers, out)
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# MLLM-MSR results: {args.dataset}\n\nCommand: `python benchmarks/mllm_msr_results.py {cmd}`\n\n"
            + results_table(out, ["main"] + [v for v in variants if v != "main"], args.seeds, baselines,
                            ablation_seeds))
    if args.speed:
        text += speed_table(out, args.seeds[0], args.tpad_run, args.speed_users)
    res = ROOT / "benchmarks" / "results"
    (res / f"{args.results_name or 'mllm_msr_' + short}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
