"""Where TPAD's transition signal stops, on a catalogue where it is planted (issue 10). Prints a table.

    python benchmarks/tpad_planted.py --seeds 0 1 2

The catalogue (``data.synthetic.write_planted_transitions``): 40 items, 300 sessions that walk one hidden cycle, item
text and "image" unrelated to the cycle. TPAD with the tiny random LM (the test's settings), per seed, with stage 2b's
lower bound MINE (the seed's) or InfoNCE on cosines with D_T frozen and gamma2 = 1 (the variant most likely to move
the Transfer geometry into h). Validation transition probe (HR@10, MRR) of the raw feature, the Transfer states, the
Knowledge embedding after stage 1 and the exports after stage 2b; chance HR@10 is in the last column.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distillrec.data.synthetic import write_planted_transitions  # noqa: E402
from distillrec.evaluation.report import fmt_number, markdown_table  # noqa: E402
from distillrec.methods.tpad.config import TPADConfig  # noqa: E402
from distillrec.methods.tpad.pipeline import run_tpad  # noqa: E402

VARIANTS = {
    "mine": {"epochs": 2, "batch_size": 16, "export": "h_dl"},
    "cosine": {"epochs": 4, "batch_size": 16, "export": "h_dl", "lower_bound": "cosine_infonce", "freeze_dt": True,
               "gamma1": 0.0, "gamma2": 1.0},
}
ROWS = ["raw attributes_onehot", "transfer states", "knowledge after stage 1", "exported (final)", "exported D_L(h)"]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="planted"))
    write_planted_transitions(tmp / "data")
    probes: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        for v, align in VARIANTS.items():
            for seed in args.seeds:
                cfg = TPADConfig(**{
                    "dataset": {"name": "toy", "format": "s3rec", "path": str(tmp / "data")},
                    "lm": {"name": "tiny", "seed": seed},
                    "multimodal": {"connector": "mlp", "lora_r": 8, "lora_dropout": 0.0},
                    "image_features": "attributes_onehot", "text_fields": ["textual_id"], "text_view": None,
                    "keywords": {"fields": ["textual_id"], "category_field": None, "title_terms": 0},
                    "knowledge": {"epochs": 1, "batch_size": 16, "gr_items": 0},
                    "transfer": {"epochs": 5, "steps_per_epoch": 20, "batch_size": 16, "lr": 0.01,
                                 "heldout_pairs": 64, "context_items": 0},
                    "align": align, "embed_batch_size": 32, "progress": False, "seed": seed, "num_threads": 1,
                    "out": str(tmp / f"{v}-{seed}")})
                probes[v].append(run_tpad(cfg, log=lambda s: None)["probe"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = []
    for v, runs in probes.items():
        for row in ROWS:
            hr = [p[row]["valid"]["hr@10"] for p in runs]
            mrr = [p[row]["valid"]["mrr"] for p in runs]
            lines.append([v, row, " / ".join(fmt_number(x, 3) for x in hr), fmt_number(float(np.mean(hr)), 3),
                          " / ".join(fmt_number(x, 3) for x in mrr), fmt_number(float(np.mean(mrr)), 3),
                          fmt_number(runs[0][row]["valid"]["chance_hr@10"], 3)])
    text = (f"# TPAD on a planted transition (seeds {args.seeds})\n\nCommand: `python benchmarks/tpad_planted.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            + markdown_table(["stage 2b", "representation", "valid HR@10 per seed", "mean", "valid MRR per seed",
                              "mean", "chance HR@10"], lines) + "\n")
    (ROOT / "benchmarks" / "results" / "tpad_planted.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
