"""TPAD with SmolLM2 cut to 8 layers (the CPU recipes) against all 30 (issue 10, item 6): per stage seconds, the
keyword generation rate, the Transfer tower's held-out retrieval, the transition probe of every representation and
a paired test of the two exports on the test transitions. Prints a Markdown table.

    python benchmarks/tpad_layers.py --recipe demo --layers 8 30 --out runs/layers

Each depth is ``distillrec tpad configs/tpad/<recipe>.yaml --set multimodal.num_layers=N`` into
``<out>/tpad/layers<N>``; a finished run there (its ``report.json`` with that depth) is reused, a killed one resumes
from its stage checkpoints. ``--threads`` is TPAD's torch thread count (its float sums depend on it: compare depths
at one count). The recipe's dataset is the probe's dataset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distillrec.data.loaders import load_dataset  # noqa: E402
from distillrec.evaluation.metrics import paired_test  # noqa: E402
from distillrec.evaluation.probe import held_out_transitions, transition_probe  # noqa: E402
from distillrec.evaluation.report import fmt_number, markdown_table  # noqa: E402
from distillrec.methods.tpad.config import load_tpad_config  # noqa: E402

STAGES = ("load_lm", "knowledge", "transfer", "align", "embed")


def run_depth(recipe: Path, layers: int, out: Path, threads: int) -> dict:
    folder = out / "tpad" / f"layers{layers}"
    report = folder / "report.json"
    if report.is_file() and json.loads(report.read_text())["config"]["multimodal"]["num_layers"] == layers:
        print(f"layers {layers}: reusing {folder}", file=sys.stderr)
    else:
        subprocess.run(["distillrec", "tpad", str(recipe), "--out", str(folder), "--set",
                        f"multimodal.num_layers={layers}", "--set", f"num_threads={threads}", "--set",
                        "progress=false"], check=True)
    return json.loads(report.read_text())


def export_rr(folder: Path, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    from safetensors.numpy import load_file

    emb = load_file(str(folder / "embeddings" / "item_embeddings.safetensors"))
    return transition_probe(np.concatenate([emb["image"], emb["text"]], 1), src, dst)["per_row_rr"]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="demo", help="configs/tpad/<recipe>.yaml")
    ap.add_argument("--layers", nargs="+", type=int, default=[8, 30])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "layers")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    recipe = ROOT / "configs" / "tpad" / f"{args.recipe}.yaml"
    reports = {n: run_depth(recipe, n, args.out, args.threads) for n in args.layers}

    rows = []
    for n, r in reports.items():
        sec = r["seconds"]
        know, align = r["stages"]["knowledge"]["history"], r["stages"]["align"]["history"]
        transfer = r["stages"]["transfer"]["history"][-1]
        rows.append([n, *(fmt_number(sec.get(s), 0) for s in STAGES),
                     fmt_number(sum(sec[s] for s in STAGES if s != "load_lm"), 0),
                     f"{fmt_number(know[-1].get('gr_both'), 3)} / {fmt_number(align[-1].get('gr_both'), 3)}",
                     fmt_number(align[-1].get("gr_image"), 3), fmt_number(transfer.get("heldout_mrr"), 4),
                     *(fmt_number(r["probe"][k]["valid"]["mrr"], 4) for k in
                       ("transfer states", "knowledge after stage 1", "exported (final)")),
                     fmt_number(r["probe"]["exported (final)"]["test"]["mrr"], 4)])
    first = next(iter(reports.values()))["probe"]
    raw = [f"{k.removeprefix('raw ')} valid MRR {fmt_number(v['valid']['mrr'], 4)} (test "
           f"{fmt_number(v['test']['mrr'], 4)})" for k, v in first.items() if k.startswith("raw ")]
    text = (f"# TPAD: 8 against 30 LM layers ({args.recipe})\n\nCommand: `python benchmarks/tpad_layers.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`; TPAD on {args.threads} torch thread(s).\n\n"
            + markdown_table(["layers", *(f"{s} s" for s in STAGES), "stages + export s", "GR both: stage 1 / 2b", "GR image (2b)",
                              "Transfer held-out MRR", "probe valid MRR: Transfer states", "stage-1 h", "export",
                              "export test MRR"], rows)
            + "\n\nRaw features (the same in every run): " + "; ".join(raw) + ".\n")
    depths = list(reports)
    if len(depths) >= 2:
        ds = load_dataset(load_tpad_config(recipe).dataset)
        src, dst = held_out_transitions(ds.test)
        a, b = depths[-1], depths[0]
        t = paired_test(export_rr(args.out / "tpad" / f"layers{a}", src, dst),
                        export_rr(args.out / "tpad" / f"layers{b}", src, dst), "mrr")
        text += (f"\nExport with {a} layers against {b}, test MRR paired over {len(src)} test transitions: "
                 f"{t.mean_diff:+.4f} (t p {t.t_pvalue:.2g}, Wilcoxon p {t.wilcoxon_pvalue:.2g}).\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
