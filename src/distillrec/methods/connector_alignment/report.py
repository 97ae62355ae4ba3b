"""Connector alignment's report: before/after held-out caption loss and keyword recall against chance."""

from __future__ import annotations

from typing import Any

from ...evaluation.report import fmt_number, markdown_table


def render_markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    b, a = r["before"], r["after"]
    lines = [
        f"# Connector alignment pretraining: {r['dataset']}",
        "",
        f"LM `{r['lm']}` ({r['dtype']}, {r['lm_parameters']:,} parameters, frozen, no LoRA); connector "
        f"`{r['connector']}` on `{c['image_feature']}` features (d={r['d_image']}), {r['trainable_parameters']:,} "
        f"trainable parameters. {r['n_train']} training items, {r['n_heldout']} held-out items, {c['epochs']} epochs, "
        f"lr {c['lr']}, batch {c['batch_size']}, seed {c['seed']}.",
        "",
        f"Prompt `{c['prompt']}`, answer `{c['target_template']}` (at most {c['max_answer_tokens']} tokens); "
        f"keyword fields {c['keyword_fields']}; greedy generation of {c['max_new_tokens']} tokens.",
        "",
        markdown_table(["held-out", "caption loss", "perplexity", "keyword recall", "chance", "p (permutation)",
                        "items scored"],
                       [[name, fmt_number(x["caption_loss"], 4), fmt_number(x["caption_ppl"], 2),
                         fmt_number(x.get("keyword_recall"), 3), fmt_number(x.get("chance"), 3),
                         fmt_number(x.get("p_value"), 4), x.get("n_keyword_items")]
                        for name, x in (("before", b), ("after", a))]),
        "",
        "Keyword recall: fraction of held-out items whose greedy generation from the image tokens alone contains at "
        "least one of the item's category words. Chance: " + r["chance_definition"] + ". p: one-sided permutation "
        "test over 1000 random n-cycles (no item scored against itself).",
    ]
    if r["common_words_removed"]:
        lines += ["", f"Words in more than {c['max_keyword_df']:.0%} of items, not counted as category words: "
                      + ", ".join(r["common_words_removed"][:30])]
    if r["history"]:
        lines += ["", markdown_table(["epoch", "train loss", "held-out caption loss", "seconds"],
                                     [[h["epoch"], fmt_number(h["train_loss"], 4), fmt_number(h["heldout_loss"], 4),
                                       h.get("seconds")] for h in r["history"]])]
    if r["examples"]:
        lines += ["", markdown_table(["item", "target", "category words", "before", "after"],
                                     [[e["item"], e["target"], " ".join(e["keywords"]), e["before"], e["after"]]
                                      for e in r["examples"]])]
    if r["notes"]:
        lines += ["", "Notes: " + "; ".join(r["notes"])]
    s = r["seconds"]
    lines += ["", f"Time: features {s['features']} s, LM load {s['load_lm']} s, training {s['train']} s, total "
                  f"{s['total']} s ({r['torch_threads']} torch threads)."
              + (f" Resumed from `{r['resumed_from']}`." if r["resumed_from"] else ""), ""]
    return "\n".join(lines)
