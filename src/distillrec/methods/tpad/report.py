"""TPAD's run report: per-stage tables (losses, keyword generation rates), embeddings, time."""

from __future__ import annotations

from typing import Any

from ...evaluation.report import fmt_number, markdown_table


def render_markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"# TPAD run: {c['dataset']['name']}", "",
             f"LM `{c['lm']['name']}` ({c['multimodal'].get('num_layers') or 'all'} layers), image features "
             f"`{c['image_features'] if c['use_image'] else None}`, text {'on' if c['use_text'] else 'off'}, "
             f"towers {c['towers']}, gamma1 {c['align']['gamma1']}, gamma2 {c['align']['gamma2']}, seed {c['seed']}.",
             ""]
    st = r.get("stages", {})

    def table(stage: str, columns: dict[str, str]) -> list[str]:
        rows = [[h["epoch"], *(fmt_number(h.get(k), 3) for k in columns)] for h in st[stage]["history"]]
        return [markdown_table(["epoch", *columns.values()], rows), ""]

    gr = {"gr_both": "GR both", "gr_image": "GR image", "gr_text": "GR text"}
    if "knowledge" in st:
        lines += ["## Stage 1: Knowledge-MLLM", ""]
        lines += table("knowledge", {"loss": "loss", "gen": "L_gen", "l_v": "L^v", "l_t": "L^t", **gr})
        lines += ["GR: mean fraction of an item's keywords in a greedy answer from a prompt with both modalities, "
                  "the image only, or the text only, on held-out items (epoch 0 = before training).", ""]
    if "transfer" in st:
        lines += ["## Stage 2a: Transfer-MLLM", ""]
        lines += table("transfer", {"transition": "transition InfoNCE", "gen": "L_gen"})
    if "align" in st:
        lines += ["## Stage 2b: Transitional pattern alignment", ""]
        lines += table("align", {"loss": "loss", "gen": "L_gen", "club": "CLUB (min)", "mine": "MINE (max)", **gr})
    if r.get("embeddings"):
        e = r["embeddings"]
        lines += [f"Embeddings: `{e['path']}` ({e['n_items']} items, dims {e.get('dims')}).", ""]
    lines += ["Time (s): " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()), ""]
    if r.get("notes"):
        lines += ["Notes: " + "; ".join(r["notes"]), ""]
    return "\n".join(lines)
