"""MLLM-MSR's report as Markdown: the sampled-candidate table (MLLM-MSR, zero-shot, the baselines on the same
candidates), the cold-target slice, paired tests, the re-ranker table and the cost of every stage."""

from __future__ import annotations

from typing import Any

from ...evaluation.report import fmt_number, markdown_table

METRICS = ("auc", "auc_pooled", "hr@1", "hr@5", "hr@10", "mrr@5", "ndcg@5")


def _cell(v: Any) -> str:
    if isinstance(v, dict):
        return fmt_number(v.get("mean"), 4, v.get("ci95"))
    return fmt_number(v, 4)


def cost_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per stage: LLM calls, tokens and seconds in all and per user (history / ranked user)."""
    rows = []
    cost = report.get("cost", {})
    n_hist = (cost.get("preferences") or {}).get("histories")
    for name, c in cost.items():
        if not c:
            continue
        per = c.get("users") or n_hist or 1
        calls = c.get("calls", c.get("candidates"))
        tokens = c.get("tokens", (c.get("prompt_tokens") or 0) + (c.get("generated_tokens") or 0))
        rows.append([name, fmt_number(calls, 0), fmt_number(tokens, 0), fmt_number(c.get("seconds"), 1),
                     fmt_number((calls or 0) / per, 2), fmt_number(tokens / per, 1),
                     fmt_number((c.get("seconds") or 0) / per, 3)])
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    p = report["protocol"]
    lines = [f"# MLLM-MSR on {report['dataset']}", "",
             f"LM `{cfg['lm']['name']}` ({cfg['lm']['dtype']}), preference summaries {cfg['preference']} "
             f"(block size {cfg['block_size']}, last {cfg['history_len']} items), image summaries "
             f"{'on' if cfg['image_summary'] and cfg['image_features'] else 'off'}, seed {cfg['seed']}. "
             f"{report['n_train_users']} training users ({report['n_train_pairs']} yes/no pairs), "
             f"{report['n_eval_users']} ranked users.", "",
             f"**Sampled protocol** (not full ranking): each ranked user's {p['split']} target + {p['n_negatives']} "
             f"negatives drawn by seed {p['seed']} from {p['negatives_from']}; every model ranks the same "
             f"{p['n_negatives'] + 1} candidates. AUC = per-user share of negatives ranked below the target (ties "
             "1/2), `auc_pooled` = one ROC AUC over all users' pairs (the official code's).", ""]
    metrics = report.get("metrics")
    if metrics:
        rows = []
        names = {"test": "MLLM-MSR (test)", "valid": "MLLM-MSR (valid)", "zero_shot_test": "LM without SFT (test)"}
        for key in ("test", "zero_shot_test", "valid"):
            if key in metrics:
                rows.append([names[key], *(_cell(metrics[key].get(m)) for m in METRICS),
                             _cell((metrics[key].get("cold") or {}).get("hr@5"))])
        for b in report.get("baselines", []):
            rows.append([f"{b['model']} `{b['run']}` ({len(b['seeds'])} seeds)",
                         *(_cell(b["metrics"].get(m)) for m in METRICS), _cell(b["cold"].get("hr@5"))])
        n_cold = (metrics.get("test", {}).get("cold") or {}).get("n")
        lines += [markdown_table(["model", *METRICS, f"cold hr@5 (n={n_cold})"], rows), ""]
        if report.get("baselines"):
            prow = []
            for b in report["baselines"]:
                for m, t in b["paired_msr_vs_this"].items():
                    prow.append([b["model"], m, fmt_number(t["mean_a"], 4), fmt_number(t["mean_b"], 4),
                                 fmt_number(t["mean_diff"], 4), f"{t['t_pvalue']:.2g}",
                                 f"{t['wilcoxon_pvalue']:.2g}"])
            lines += ["Paired tests on the test users (MLLM-MSR − baseline; a baseline's per-user metric is its mean "
                      "over seeds):", "", markdown_table(["baseline", "metric", "MLLM-MSR", "baseline", "diff",
                                                         "t p", "Wilcoxon p"], prow), ""]
    rr = report.get("rerank")
    if rr:
        ks = ("hr@5", "hr@10", "ndcg@10", "mrr@10")
        lines += [f"Re-ranking the top-{rr['top_n']} of `{rr['run']}` ({rr['model']}, seed {rr['seed']}) inside full "
                  f"ranking ({fmt_number(rr['targets_in_top_n'], 3)} of the test targets are in that top-"
                  f"{rr['top_n']}):", "",
                  markdown_table(["", *ks], [["base", *(fmt_number(rr["base"].get(k), 4) for k in ks)],
                                             ["re-ranked by MLLM-MSR",
                                              *(fmt_number(rr["reranked"].get(k), 4) for k in ks)]]), ""]
        t = rr["paired_reranked_vs_base"]["ndcg@10"]
        lines += [f"ndcg@10 re-ranked − base: {fmt_number(t['mean_diff'], 4)} (t p {fmt_number(t['t_pvalue'], 3)}, "
                  f"Wilcoxon p {fmt_number(t['wilcoxon_pvalue'], 3)}).", ""]
    rec = report.get("recommender")
    if rec and rec.get("curve"):
        c = rec["curve"]
        lines += [f"SFT: {rec['steps']} steps, {rec['trainable_parameters']} LoRA parameters, "
                  f"{fmt_number(rec.get('seconds'), 1)} s; train loss {fmt_number(c[0].get('train_loss'), 4)} "
                  f"(first {len(c) and c[0]['step']} steps) -> {fmt_number(c[-1].get('train_loss'), 4)} (last).", ""]
    crow = cost_rows(report)
    if crow:
        lines += ["Cost (summaries: calls = generated prompts, per history; scoring: calls = candidates scored, per "
                  "ranked user):", "",
                  markdown_table(["stage", "calls", "tokens", "s", "calls/user", "tokens/user", "s/user"], crow), ""]
    for ex in report.get("preference_examples", [])[:2]:
        lines += [f"Preference of user {ex['user']} (history: {'; '.join(ex['history'][:6])}): {ex['summary']}", ""]
    for ex in report.get("image_summary_examples", [])[:3]:
        lines += [f"Image summary of {ex['title']!r}: {ex['summary']}", ""]
    lines.append(f"Time (s): {report.get('seconds')}")
    return "\n".join(lines) + "\n"
