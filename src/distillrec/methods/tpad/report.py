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
        lines += table("transfer", {"transition": "transition InfoNCE", "gen": "L_gen",
                                    "heldout_top1": "held-out top-1", "heldout_hr@10": "held-out HR@10",
                                    "heldout_mrr": "held-out MRR"})
        h = next((h for h in st["transfer"]["history"] if h.get("heldout_n")), None)
        if h:
            lines += [f"Held-out retrieval: {h['heldout_n']} validation transitions (last item, with its session "
                      f"context, -> next item), each anchor ranking all {h['heldout_n']} targets through the "
                      f"transition head; chance top-1 = {fmt_number(h['heldout_chance_top1'], 4)}. Read the InfoNCE "
                      "against this, not against ln(batch size).", ""]
    if "align" in st:
        lines += ["## Stage 2b: Transitional pattern alignment", ""]
        lines += table("align", {"loss": "loss", "gen": "L_gen", "club": "CLUB (min)", "mine": "MINE (max)", **gr})
    if r.get("probe"):
        p = r["probe"]
        first = next(iter(p.values()))
        lines += ["## Transition probe", "",
                  "Next-item retrieval from the embedding alone: the last item of each held-out history ranks the "
                  "whole catalogue by cosine (columns standardised), HR@10 and MRR of the true next item; "
                  f"chance HR@10 = {fmt_number(first['valid']['chance_hr@10'], 4)} "
                  f"({first['valid']['n']} validation, {first['test']['n']} test transitions).", ""]
        rows = [[name, fmt_number(v["valid"]["hr@10"], 4), fmt_number(v["valid"]["mrr"], 4),
                 fmt_number(v["test"]["hr@10"], 4), fmt_number(v["test"]["mrr"], 4)] for name, v in p.items()]
        lines += [markdown_table(["embedding", "valid HR@10", "valid MRR", "test HR@10", "test MRR"], rows), ""]
    if r.get("mi_to_transfer"):
        lines += ["## What the export holds of the Transfer states", "",
                  "MI estimates between each representation and the Transfer states from estimators fitted afresh "
                  "after training (both sides standardised, first 32 principal components; fitted on 80% of the "
                  "items, read on the other 20%), beside the same on shuffled pairs (no dependence).", ""]
        rows = [[name, *(fmt_number(v[k], 3) for k in ("mine_heldout", "mine_shuffled_heldout", "club_heldout",
                                                       "club_shuffled_heldout"))]
                for name, v in r["mi_to_transfer"].items()]
        lines += [markdown_table(["representation", "MINE (lower)", "MINE, shuffled", "vCLUB (upper)",
                                  "vCLUB, shuffled"], rows), ""]
    if r.get("embeddings"):
        e = r["embeddings"]
        lines += [f"Embeddings: `{e['path']}` ({e['n_items']} items, dims {e.get('dims')}).", ""]
    lines += ["Time (s): " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()), ""]
    if r.get("notes"):
        lines += ["Notes: " + "; ".join(r["notes"]), ""]
    return "\n".join(lines)
