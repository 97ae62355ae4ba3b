"""bf16 autocast against fp32 for TPAD's LM work on this machine: same batches, same weights; prints a table.

For the LM of a TPAD recipe (default ``configs/tpad/demo.yaml``: SmolLM2-135M, first 8 layers), on ``--batches``
batches of ``--batch-size`` item prompts from the recipe's dataset (text only, so no image encoder runs):

* a training step's forward + backward (the Knowledge tower's answer-only LM loss, ``MultimodalLM.embed`` with
  answers) in fp32 and under ``torch.autocast(bfloat16)``: seconds per step (median) and the relative difference of
  the loss;
* the summary states (``[IMG_SUM; TEXT_SUM]``, inference): seconds per batch and the cosine between fp32 and bf16
  states (min and mean over items).

    python benchmarks/bf16_check.py --threads 2 --batches 6

Timings only mean something with nothing else running on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distillrec.config import set_num_threads  # noqa: E402
from distillrec.data.item_text import item_texts  # noqa: E402
from distillrec.data.loaders import load_dataset  # noqa: E402
from distillrec.evaluation.report import fmt_number, markdown_table  # noqa: E402
from distillrec.methods.tpad.config import KNOWLEDGE, load_tpad_config  # noqa: E402
from distillrec.methods.tpad.pipeline import build_tpad_model  # noqa: E402
from distillrec.training.stages import autocast_context  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tpad" / "demo.yaml")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override key=value")
    args = ap.parse_args(argv)
    set_num_threads(args.threads)
    cfg = load_tpad_config(args.config, args.sets)
    ds = load_dataset(cfg.dataset)
    texts = item_texts(ds.items, cfg.text_fields)
    mm = build_tpad_model(cfg, 1)
    mm.use_adapter(KNOWLEDGE)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(texts), args.batch_size, replace=False) for _ in range(args.batches)]
    answers = [f"Keywords: {t.split('.')[0][:40]}" for t in texts]
    no_img = torch.zeros(args.batch_size, dtype=torch.bool)
    rows, out = [], {}
    for mode in ("off", "bf16"):
        step_s, losses, state_s, states = [], [], [], []
        for b in batches:
            mm.train()
            mm.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with autocast_context(mode):
                o = mm.embed([texts[i] for i in b], None, adapter=KNOWLEDGE, image_mask=no_img,
                             answers=[answers[i] for i in b])
            o["lm_loss"].float().backward()
            step_s.append(time.perf_counter() - t0)
            losses.append(float(o["lm_loss"].detach()))
            mm.eval()
            with torch.no_grad():
                t0 = time.perf_counter()
                with autocast_context(mode):
                    e = mm.embed([texts[i] for i in b], None, adapter=KNOWLEDGE, image_mask=no_img)
                state_s.append(time.perf_counter() - t0)
            states.append(torch.cat([e["image"], e["text"]], -1).float())
        out[mode] = (statistics.median(step_s[1:] or step_s), np.array(losses), statistics.median(state_s[1:] or
                                                                                                  state_s),
                     torch.cat(states))
    f32, b16 = out["off"], out["bf16"]
    rel = np.abs(b16[1] - f32[1]) / np.abs(f32[1])
    cos = torch.nn.functional.cosine_similarity(f32[3], b16[3], dim=-1)
    rows = [["fp32", fmt_number(f32[0], 3), "–", fmt_number(f32[2], 3), "–"],
            ["bf16 autocast", fmt_number(b16[0], 3), f"{rel.max():.2e} (mean {rel.mean():.2e})",
             fmt_number(b16[2], 3), f"{float(cos.min()):.4f} (mean {float(cos.mean()):.4f})"]]
    text = (f"LM `{cfg.lm.name}` ({cfg.multimodal.get('num_layers') or 'all'} layers), {args.batches} batches of "
            f"{args.batch_size} items of `{cfg.dataset.name}`, {torch.get_num_threads()} torch threads; medians after "
            "the first batch.\n\n" + markdown_table(
                ["mode", "train step s", "loss rel. diff vs fp32 (max)", "states s / batch",
                 "state cosine vs fp32 (min)"], rows) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
