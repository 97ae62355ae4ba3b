"""LLMD4Rec (issue 12): the distilled CRM against the same CRM trained alone, and the one-directional ablation.
Prints the tables and writes ``benchmarks/results/<results-name>.md`` (default ``llmd4rec_<short>``).

    python benchmarks/llmd4rec_results.py --dataset amazon2018-scientific-text --seeds 1 2 3 4 5
    python benchmarks/llmd4rec_results.py --dataset amazon2014-beauty --seeds 1 2 3 4 5
    python benchmarks/llmd4rec_results.py --dataset demo --seeds 1 2 3            # configs/llmd4rec/demo.yaml
    ... --variants mutual llm_to_crm --set rounds=1 --set llm_users=500 --crm gru4rec

What runs (each variant one ``distillrec method llmd4rec configs/llmd4rec/<short>.yaml`` subprocess with one torch
thread, one after the other; every stage resumes, so a rerun after a kill continues and a finished variant is read
back as it is):

* ``<out>/plain``: the CRM trained alone with every ``--seeds`` seed, shared by the variants (``plain_dir``);
* ``<out>/<variant>``: ``mutual`` (both KL terms) and ``llm_to_crm`` (the LLM step without its KL term from the
  CRM: one-directional distillation, LLM -> CRM only); each writes its distilled CRM run folder
  (``<out>/<variant>/crm/distilled``, the same seeds), the LLM recommender's evaluation and the cost of every round.

Tables: test HR@10 / NDCG@10 over every test user (full ranking), mean ± 95% CI over the CRM seeds; paired t and
Wilcoxon tests per test user against the plain CRM (each user's NDCG@10 averaged over the seeds); the cold-target
slice (test targets seen at most 4 times in training); parameters; the LLM recommender alone on its ranked users
(full catalogue, re-ranking the distilled CRM's top-M, and that CRM on the same users); the cost per round. On
Beauty the published full-ranking numbers (``shared/reference/anchors.md``: S3-Rec repo SASRec NDCG@10 .0318, ICLRec
.0403) stand beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distillrec.evaluation.report import MISSING, fmt_number, markdown_table  # noqa: E402
from distillrec.methods.llmd4rec.report import fmt_p  # noqa: E402

SHORT = {"amazon2018-scientific-text": "scientific-text", "amazon2014-beauty": "beauty", "demo": "demo"}
ANCHORS = {  # shared/reference/anchors.md, section 2.1 and 2.4 (full ranking, S3-Rec's Beauty split)
    "amazon2014-beauty": [("SASRec, S3-Rec repo all_rank table [A-img]", 0.0605, 0.0318),
                          ("ICLRec, released checkpoint [A]", 0.0744, 0.0403)],
}
LABEL = {"mutual": "distilled, mutual (LLM ⇄ CRM)", "llm_to_crm": "distilled, one-directional (LLM → CRM)"}


def run_variant(args: argparse.Namespace, variant: str, out: Path, log) -> dict:
    short = SHORT[args.dataset]
    seeds = "[" + ",".join(str(s) for s in args.seeds) + "]"
    sets = [f"crm_seeds={seeds}", f"direction={variant}", f"plain_dir={out / 'plain'}", "num_threads=1",
            "progress=false", *args.set]
    if args.crm:
        sets.append(f"crm.model.name={args.crm}")
    cmd = [sys.executable, "-m", "distillrec", "method", "llmd4rec", str(ROOT / "configs" / "llmd4rec" /
                                                                        f"{short}.yaml"),
           "--out", str(out / variant)]
    for s in sets:
        cmd += ["--set", s]
    report = out / variant / "report.json"
    if report.is_file() and not args.rerun:
        r = json.loads(report.read_text())
        if "crm" in r and r["config"]["crm_seeds"] == list(args.seeds):
            log(f"{variant}: finished, read back")
            return r
    log(f"{variant}: {' '.join(cmd)}")
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (out / variant).mkdir(parents=True, exist_ok=True)
    with open(out / f"{variant}.log", "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}); see {out / f'{variant}.log'}")
    log(f"{variant}: done in {time.time() - t0:.0f}s")
    return json.loads(report.read_text())


def _ci(d: dict | None) -> str:
    return fmt_number(d.get("mean"), 4, d.get("ci95")) if d else MISSING


def crm_table(reports: dict[str, dict]) -> str:
    rows = []
    first = next(iter(reports.values()))["crm"]
    base = first["base"]
    rows.append(["plain (the CRM alone)", base["model"], len(base["seeds"]), _ci(base["test"]["hr@10"]),
                 _ci(base["test"]["ndcg@10"]), MISSING, MISSING, MISSING, _ci(base["cold"]), MISSING, MISSING,
                 f"{base['params']:,}"])
    for variant, rep in reports.items():
        c = rep["crm"]
        o, t, tc = c["other"], c["paired"], c.get("paired_cold") or {}
        rows.append([LABEL.get(variant, variant), o["model"], len(o["seeds"]), _ci(o["test"]["hr@10"]),
                     _ci(o["test"]["ndcg@10"]), f"{t['mean_diff']:+.4f}", fmt_p(t["t_pvalue"]),
                     fmt_p(t["wilcoxon_pvalue"]), _ci(o["cold"]),
                     f"{tc['mean_diff']:+.4f}" if tc else MISSING, fmt_p(tc.get("t_pvalue")),
                     f"{o['params']:,}" + ("" if c["same_shapes"] else " (shapes differ!)")])
    header = ["run", "CRM", "seeds", "test HR@10", "test NDCG@10", "Δ NDCG@10 vs plain", "paired t p",
              "Wilcoxon p", f"cold NDCG@10 (n={first['n_cold']})", "cold Δ", "cold t p", "parameters"]
    return markdown_table(header, rows)


def llm_table(reports: dict[str, dict]) -> str:
    rows = []
    for variant, rep in reports.items():
        t = rep["llm"]["test"]
        for key, what in (("full", "LLM recommender, full catalogue"), ("rerank", "LLM re-ranking the CRM's top-M"),
                          ("crm", "distilled CRM (first seed), same users")):
            rows.append([LABEL.get(variant, variant), what, t["n"], fmt_number(t[key].get("hr@10"), 4),
                         fmt_number(t[key].get("ndcg@10"), 4), fmt_number(t[f"{key}_cold"].get("ndcg@10"), 4)])
    n_cold = next(iter(reports.values()))["llm"]["test"]["n_cold"]
    return markdown_table(["variant", "model", "users", "test HR@10", "test NDCG@10", f"cold NDCG@10 (n={n_cold})"],
                          rows)


def cost_table(reports: dict[str, dict]) -> str:
    rows = []
    for variant, rep in reports.items():
        for r in rep.get("rounds", []):
            parts = {k: (r.get(k) or {}).get("seconds") for k in ("crm_candidates", "llm_step", "teacher_logits",
                                                                    "crm_step")}
            rows.append([variant, r["round"], *(fmt_number(v, 0) for v in parts.values()),
                         fmt_number(sum(v for v in parts.values() if v), 0),
                         fmt_number((r.get("llm_step") or {}).get("forward_backward_passes"), 0),
                         fmt_number((r.get("teacher_logits") or {}).get("forward_passes"), 0),
                         fmt_number((r.get("crm_step") or {}).get("train_s_per_epoch"), 2),
                         fmt_number(max((v or {}).get("peak_rss_mb", 0) for v in r.values() if isinstance(v, dict)),
                                    0)])
    return markdown_table(["variant", "round", "CRM candidates s", "LLM step s", "teacher logits s", "CRM step s",
                           "round s", "LLM fwd+bwd passes", "LLM fwd passes", "CRM s/epoch", "peak RSS MB"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, choices=sorted(SHORT))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--variants", nargs="+", default=["mutual", "llm_to_crm"], choices=["mutual", "llm_to_crm"])
    ap.add_argument("--crm", default=None, help="the CRM model (default: the recipe's, SASRec); e.g. gru4rec")
    ap.add_argument("--set", action="append", default=[], help="a recipe override, key=value (repeatable)")
    ap.add_argument("--out", default=None, help="default runs/llmd4rec/results/<short>")
    ap.add_argument("--results-name", default=None)
    ap.add_argument("--rerun", action="store_true", help="rerun the method even when its report is there "
                                                         "(it resumes and reuses finished stages)")
    args = ap.parse_args()
    short = SHORT[args.dataset]
    out = Path(args.out or ROOT / "runs" / "llmd4rec" / "results" / short)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)

    t0 = time.time()
    reports = {v: run_variant(args, v, out, log) for v in args.variants}
    cmd = " ".join(["python benchmarks/llmd4rec_results.py", "--dataset", args.dataset, "--seeds",
                    *map(str, args.seeds), "--variants", *args.variants,
                    *(["--crm", args.crm] if args.crm else []), *(f"--set {s}" for s in args.set)])
    cfg = next(iter(reports.values()))["config"]
    lines += [f"# LLMD4Rec on {args.dataset}", "", f"Command: `{cmd}` (this run: {time.time() - t0:.0f} s; the "
              "method's stages are reused when finished, so the per-round costs below are the ones measured when "
              "each ran, one torch thread).", "",
              f"Recipe `configs/llmd4rec/{short}.yaml`: CRM `{cfg['crm']['model']['name']}`, LLM `{cfg['lm']['name']}` "
              f"(first {cfg['multimodal'].get('num_layers', 'all')} layers, LoRA r={cfg['multimodal'].get('lora_r', 8)}"
              f"), {cfg['rounds']} round(s), τ {cfg['temperature']}, λ_CRM {cfg['lambda_crm']}, λ_LLM "
              f"{cfg['lambda_llm']}, weights {cfg['weighting']}, candidates = target + the CRM's top-"
              f"{cfg['n_candidates']}, the CRM's top-{cfg['augment_top_k']} in the prompt; "
              f"{next(iter(reports.values()))['n_distill_rows']} training users with teacher logits, the LLM trains "
              f"on {next(iter(reports.values()))['n_llm_rows']}.", "",
              "## The distilled CRM against the CRM trained alone", "",
              "Full ranking over all items, every test user, history not masked, pessimistic ties, best-validation "
              "epoch; mean ± 95% CI over the CRM seeds; paired tests per test user (NDCG@10 averaged over seeds, "
              "variant − plain); cold = test targets seen at most 4 times in training.", "",
              crm_table(reports), ""]
    if args.dataset in ANCHORS:
        lines += ["Published full-ranking numbers on the same split (`shared/reference/anchors.md`):", "",
                  markdown_table(["source", "test HR@10", "test NDCG@10"],
                                 [[s, fmt_number(h, 4), fmt_number(n, 4)] for s, h, n in ANCHORS[args.dataset]]), ""]
    lines += ["## The LLM recommender alone", "",
              "On the users it ranks (drawn by seed): full ranking over the catalogue with the LLM's own item "
              "embeddings; re-ranking the distilled CRM's top-M (a target outside keeps the CRM's rank).", "",
              llm_table(reports), "", "## Cost", "",
              "Seconds per phase of every round on this machine (one torch thread; LLM passes = user prompts through "
              "the LM; the CRM step reads the cached teacher logits and runs no LLM pass):", "",
              cost_table(reports), ""]
    plain_metrics = out / "plain" / "metrics.json"
    if plain_metrics.is_file():
        pm = json.loads(plain_metrics.read_text())
        lines.append(f"- plain CRM: {fmt_number(pm['timing']['train_s_per_epoch'], 2)} s per training epoch, "
                     f"{fmt_number(pm['timing']['train_s'], 0)} s of training over {len(pm['seeds'])} seeds (the CRM "
                     "step's s/epoch above is the same model with the teacher term: its extra cost is one more "
                     "scoring pass of the CRM over the rows in each batch).")
    for v, rep in reports.items():
        c = rep.get("cost", {})
        lines.append(f"- {v}: plain CRM (all seeds; 0 when reused) {fmt_number((c.get('crm_warmup') or {}).get('seconds'), 0)}"
                     f" s, item states {fmt_number((c.get('item_states') or {}).get('seconds'), 0)} s "
                     f"({(c.get('item_states') or {}).get('forward_passes')} LLM passes), LLM evaluation "
                     f"{fmt_number(rep['llm']['test']['cost'].get('seconds'), 0)} s (test) + "
                     f"{fmt_number(rep['llm']['valid']['cost'].get('seconds'), 0)} s (valid), total "
                     f"{fmt_number(rep.get('seconds_total'), 0)} s in its last invocation, peak RSS "
                     f"{fmt_number(rep.get('peak_rss_mb'), 0)} MB.")
    text = "\n".join(lines) + "\n"
    print(text)
    res = ROOT / "benchmarks" / "results" / f"{args.results_name or 'llmd4rec_' + short}.md"
    res.write_text(text)
    print(f"written: {res}")


if __name__ == "__main__":
    main()
