"""LLMD4Rec's report as Markdown: the distilled CRM against the plain one (full ranking, every test user, mean ± 95%
CI over seeds, paired tests, the cold-target slice, parameters and ranking time), the LLM recommender alone (full
catalogue and re-ranking the CRM's top-M, on the ranked rows) and the cost of every round."""

from __future__ import annotations

from typing import Any

from ...evaluation.report import MISSING, fmt_number, markdown_table


def fmt_p(p: float | None) -> str:
    """A p-value: three decimals, or two significant digits below 0.001."""
    if p is None:
        return MISSING
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _ci(d: dict[str, Any] | None, digits: int = 4) -> str:
    if not d:
        return MISSING
    return fmt_number(d.get("mean"), digits, d.get("ci95"))


def crm_rows(crm: dict[str, Any], names: tuple[str, str] = ("plain", "distilled")) -> list[list[str]]:
    """Rows of the plain-vs-distilled table (also used by benchmarks/llmd4rec_results.py)."""
    rows = []
    for key, label in (("base", names[0]), ("other", names[1])):
        r = crm[key]
        t = crm["paired"] if key == "other" else None
        tc = crm.get("paired_cold") if key == "other" else None
        rows.append([label, r["model"], len(r["seeds"]), _ci(r["test"]["hr@10"]), _ci(r["test"]["ndcg@10"]),
                     _ci(r["test"]["ndcg@20"]),
                     f"{t['mean_diff']:+.4f}" if t else MISSING, fmt_p(t["t_pvalue"]) if t else MISSING,
                     fmt_p(t["wilcoxon_pvalue"]) if t else MISSING, _ci(r["cold"]),
                     fmt_p(tc["t_pvalue"]) if tc else MISSING, f"{r['params']:,}",
                     fmt_number(r["test_rank_s"], 2)])
    return rows


CRM_HEADER = ["run", "model", "seeds", "test HR@10", "test NDCG@10", "test NDCG@20", "Δ NDCG@10", "paired t p",
              "Wilcoxon p", "cold NDCG@10", "cold t p", "parameters", "test ranking s"]


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [f"# LLMD4Rec on {report['dataset']}", "",
             f"CRM `{cfg['crm']['model']['name']}`; LLM `{cfg['lm']['name']}` "
             f"(layers {cfg['multimodal'].get('num_layers', 'all')}, LoRA adapter `recommender`); {cfg['rounds']} "
             f"round(s), direction **{cfg['direction']}**, λ_CRM {cfg['lambda_crm']}, λ_LLM "
             f"{cfg['lambda_llm'] if cfg['direction'] == 'mutual' else '– (off)'}, τ {cfg['temperature']}, weights "
             f"{cfg['weighting']}; candidates = target + the CRM's top-{cfg['n_candidates']}; prompt: last "
             f"{cfg['history_len']} items + the CRM's top-{cfg['augment_top_k']} as text. "
             f"{report['n_distill_rows']} training rows with teacher logits, the LLM trains on "
             f"{report['n_llm_rows']} of them; seed {cfg['seed']}.", ""]
    crm = report.get("crm")
    if crm:
        lines += [f"**The distilled CRM against the plain one** (full ranking over all items, every test user, "
                  f"mean ± 95% CI over seeds; paired tests per test user on {crm['metric']}, each user's value "
                  f"averaged over seeds, distilled − plain; cold = test targets seen at most {crm['cold_max']} times "
                  f"in training, n = {crm['n_cold']} of {crm['n_test']}):", "",
                  markdown_table(CRM_HEADER, crm_rows(crm)), "",
                  f"Same model class and parameter shapes: {'yes' if crm['same_shapes'] else 'NO'} (the distilled "
                  "CRM is an ordinary run folder: `distillrec evaluate` / `distillrec recommend` read it as any "
                  f"other). Runs: plain `{crm['base']['run']}`, distilled `{crm['other']['run']}`.", ""]
    llm = report.get("llm")
    if llm:
        t = llm["test"]
        ks = ("hr@10", "ndcg@10", "mrr@10", "hr@20")
        rows = [["LLM recommender, full catalogue", *(fmt_number(t["full"].get(k), 4) for k in ks),
                 fmt_number(t["full_cold"].get("ndcg@10"), 4)],
                ["LLM re-ranking the distilled CRM's top-M", *(fmt_number(t["rerank"].get(k), 4) for k in ks),
                 fmt_number(t["rerank_cold"].get("ndcg@10"), 4)],
                ["distilled CRM (first seed), same rows", *(fmt_number(t["crm"].get(k), 4) for k in ks),
                 fmt_number(t["crm_cold"].get("ndcg@10"), 4)]]
        p = t["paired_rerank_vs_crm"]
        lines += [f"**The LLM recommender alone** on {t['n']} test users drawn by seed (full ranking over all items "
                  f"with the LLM's own item embeddings; and re-ranking the CRM's top-{cfg['n_candidates']}: a target "
                  "outside keeps the CRM's rank):", "",
                  markdown_table(["", *ks, f"cold NDCG@10 (n={t['n_cold']})"], rows), "",
                  f"Re-ranked − CRM NDCG@10 {fmt_number(p['mean_diff'], 4)} (t p {fmt_p(p['t_pvalue'])}, "
                  f"Wilcoxon p {fmt_p(p['wilcoxon_pvalue'])}); valid: full "
                  f"{fmt_number(llm['valid']['full'].get('ndcg@10'), 4)}, re-rank "
                  f"{fmt_number(llm['valid']['rerank'].get('ndcg@10'), 4)}, CRM "
                  f"{fmt_number(llm['valid']['crm'].get('ndcg@10'), 4)} NDCG@10.", ""]
    rounds = report.get("rounds")
    if rounds:
        rows = []
        for r in rounds:
            parts = {k: (r.get(k) or {}).get("seconds") for k in ("crm_candidates", "llm_step", "teacher_logits",
                                                                    "crm_step")}
            total = sum(v for v in parts.values() if v)
            curve = r.get("llm_curve") or []
            ce = (f"{curve[0].get('llm_ce', float('nan')):.3f} -> {curve[-1].get('llm_ce', float('nan')):.3f}"
                  if curve else MISSING)
            rows.append([r["round"], *(fmt_number(v, 1) for v in parts.values()), fmt_number(total, 1),
                         fmt_number((r.get("llm_step") or {}).get("forward_backward_passes"), 0),
                         fmt_number((r.get("teacher_logits") or {}).get("forward_passes"), 0), ce,
                         fmt_number(max((v or {}).get("peak_rss_mb", 0) for v in r.values() if isinstance(v, dict)),
                                    0)])
        lines += ["**Cost per round** (seconds on this machine; LLM passes = user prompts through the LM; the CRM "
                  "step reads cached teacher logits and runs no LLM pass):", "",
                  markdown_table(["round", "CRM candidates s", "LLM step s", "teacher logits s", "CRM step s",
                                  "round s", "LLM fwd+bwd passes", "LLM fwd passes (teacher)", "LLM CE first -> last",
                                  "peak RSS MB"], rows), ""]
    c = report.get("cost", {})
    if c:
        items = c.get("item_states") or {}
        warm = (c.get("crm_warmup") or {}).get("seconds")
        lines += [f"Plain CRM ({len(cfg['crm_seeds'])} seeds): {fmt_number(warm, 1)} s; LM load {fmt_number(c.get('load_lm_s'), 1)} s; item states "
                  f"{fmt_number(items.get('forward_passes'), 0)} passes, {fmt_number(items.get('seconds'), 1)} s; "
                  f"total {fmt_number(report.get('seconds_total'), 1)} s; peak RSS "
                  f"{fmt_number(report.get('peak_rss_mb'), 0)} MB; {report.get('torch_threads')} torch thread(s).", ""]
    return "\n".join(lines) + "\n"
