"""TPAD's full-size experiment on one large GPU (issue 10, item 9), as one prepared command; ``--tiny`` checks the same
command on a CPU at a tiny size. Prints the results tables of ``benchmarks/tpad_results.py`` and the wall time.

    python benchmarks/tpad_gpu.py                 # one CUDA GPU (an H200-class card, 16 CPU cores), target <= 10 min
    python benchmarks/tpad_gpu.py --tiny          # the same jobs on this CPU: tiny random LM, a few steps each

What the full size is, against the CPU recipe ``configs/tpad/scientific-mm.yaml`` (8 of 30 layers, 800 items, 160
steps of 2a, fp32): every layer of SmolLM2-135M, bf16 autocast (``benchmarks/bf16_check.py``: within 6.4e-4 of fp32),
every item in stages 1 and 2b, one epoch over every meta pair of order 1..3 in stage 2a, batches of 64; variants
gamma in {0, 0.1, 1} (``na``, ``full``, ``gamma1``: gamma1 = gamma2 = gamma) and ``similarity`` (gamma 0.1 plus the
neighbourhood distillation, ``align.gamma3 = 1``), each with 3 TPAD seeds; then the transition probe of every
representation, DIMO on each variant's embeddings and fused SASRec on the main variant's, against DIMO and fused
SASRec on the shipped CLIP features, 3 downstream seeds each, paired tests. Everything is an ordinary
``distillrec tpad`` / ``distillrec train`` run under ``--out``: a rerun after a kill continues.

The 10-minute budget is a target set from the CPU measurements, not yet measured on a GPU (no GPU was lent to the
session that wrote this): the script prints the wall time so the first GPU run says whether it holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import tpad_results  # noqa: E402  (benchmarks/tpad_results.py)

VARIANTS = ["na", "gamma1", "similarity"]  # with "full" (gamma 0.1), which tpad_results always runs
FULL = ["multimodal.num_layers=null", "autocast=bf16", "device=cuda", "embed_batch_size=128",
        "knowledge.max_items=null", "knowledge.batch_size=64", "knowledge.epochs=2",
        "transfer.steps_per_epoch=null", "transfer.epochs=1", "transfer.batch_size=64",
        "align.max_items=null", "align.batch_size=64", "align.epochs=2"]
TINY = ["lm.name=tiny", "lm.dtype=float32", "multimodal.max_text_tokens=24",
        "knowledge.max_items=32", "knowledge.gr_items=4", "knowledge.gr_max_new_tokens=4",
        "transfer.steps_per_epoch=2", "transfer.epochs=1", "transfer.heldout_pairs=32",
        "align.max_items=32", "align.epochs=1"]


def command(tiny: bool, out: Path) -> list[str]:
    size = TINY if tiny else FULL
    train = ["train.epochs=1"] if tiny else ["train.device=cuda"]
    argv = ["--dataset", "amazon2018-scientific-mm", "--only", *VARIANTS, "--tpad-seeds", *(["2"] if tiny else
                                                                                            ["2", "3"]),
            "--seeded-variants", "full", *VARIANTS, "--seeded-dimo-only", "--baselines", "dimo", "fused_sasrec",
            "--fused", "fused_sasrec", "--no-dl", "--seeds", *(["1"] if tiny else ["1", "2", "3"]),
            "--workers", "1" if tiny else "4", "--threads", "1" if tiny else "4", "--out", str(out),
            "--results-name", "tpad_gpu_tiny_check" if tiny else "tpad_gpu_scientific-mm"]
    for s in size:
        argv += ["--tpad-set", s]
    for s in train:
        argv += ["--train-set", s]
    return argv


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the CPU check: tiny random LM, a few steps, one epoch")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this is the GPU script; on a CPU run it with --tiny")
    out = args.out or ROOT / "runs" / ("tpad_gpu_tiny" if args.tiny else "tpad_gpu")
    t0 = time.time()
    tpad_results.main(command(args.tiny, out))
    wall = f"wall time: {time.time() - t0:.0f} s ({'tiny CPU check' if args.tiny else 'full size, GPU'})"
    note(ROOT / "benchmarks" / "results" / f"{'tpad_gpu_tiny_check' if args.tiny else 'tpad_gpu_scientific-mm'}.md",
         args.tiny, wall)
    print(f"\n{wall}")


def note(path: Path, tiny: bool, wall: str) -> None:
    """Head the results file with what made it (and, for the tiny check, that its numbers test the script only)."""
    head = ("> The CPU check of `python benchmarks/tpad_gpu.py --tiny`: tiny random LM, a few steps per stage, one "
            "epoch downstream. These numbers say that the script's jobs run end to end, nothing about TPAD.\n"
            if tiny else "> `python benchmarks/tpad_gpu.py`: TPAD's full-size experiment on one GPU.\n")
    path.write_text(head + f"> {wall}\n\n" + path.read_text())


if __name__ == "__main__":
    main()
