"""The LM jobs on a GPU, checked against the CPU at a tiny size (tiny random Llama, 90-item demo shop): TPAD's stages
(fp32 and bf16 autocast), the one-time item embedding, and the yes/no scorer with its shared-prefix key/value cache.

    python benchmarks/gpu_smoke.py [--out DIR]

Prints a table: for each check, the device it ran on, seconds, and the largest difference to the CPU result (item
embeddings: 1 - min cosine; scores: max |diff|). Without CUDA it says so and exits 0. Not a speed benchmark: the model
is tiny, so the numbers say that the device code paths work and agree, not how fast they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEMO = {"name": "demo", "options": {"n_items": 90, "n_users": 160, "write_images": False}}


def tpad_cfg(out: Path, device: str, autocast: str):
    from distillrec.methods.tpad.config import TPADConfig

    return TPADConfig(**{
        "dataset": DEMO, "lm": {"name": "tiny", "seed": 0}, "multimodal": {"connector": "mlp"},
        "image_features": "attributes_onehot", "text_fields": ["title", "category"], "text_view": None,
        "keywords": {"fields": ["category", "brand", "colour"]},
        "knowledge": {"epochs": 1, "batch_size": 8, "max_items": 32, "gr_items": 6, "gr_max_new_tokens": 4},
        "transfer": {"epochs": 2, "steps_per_epoch": 4, "batch_size": 8, "heldout_pairs": 32},
        "align": {"epochs": 1, "batch_size": 8, "max_items": 32, "export": "h_dl"},
        "embed_batch_size": 16, "progress": False, "device": device, "autocast": autocast, "out": str(out)})


def embeddings(out: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    e = load_file(str(out / "embeddings" / "item_embeddings.safetensors"))
    return torch.cat([e["image"], e["text"]], 1)[1:].float()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_smoke")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return {}
    from distillrec.evaluation.report import markdown_table
    from distillrec.llm.builder import LMSpec, build_multimodal, multimodal_config
    from distillrec.llm.scoring import score_yes_no
    from distillrec.methods.tpad.pipeline import run_tpad

    rows, result = [], {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    runs = {}
    for device, autocast in (("cpu", "off"), ("cuda", "off"), ("cuda", "bf16")):
        t0 = time.perf_counter()
        r = run_tpad(tpad_cfg(args.out / f"tpad-{device}-{autocast}", device, autocast), log=lambda s: None)
        runs[(device, autocast)] = (embeddings(args.out / f"tpad-{device}-{autocast}"), r,
                                    round(time.perf_counter() - t0, 2))
    ref = runs[("cpu", "off")][0]
    for (device, autocast), (emb, r, secs) in runs.items():
        cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
        probe = r["probe"]["exported (final)"]["valid"]["mrr"]
        rows.append([f"TPAD all stages + embed + probe ({autocast})", device, secs,
                     f"{1 - float(cos.min()):.2e}", f"{probe:.4f}"])
        result[f"tpad_{device}_{autocast}"] = {"seconds": secs, "one_minus_min_cos": 1 - float(cos.min()),
                                               "probe_valid_mrr": probe}
    spec = LMSpec(name="tiny", seed=0)
    mcfg = multimodal_config(spec, {"connector": "mlp", "lora_dropout": 0.0}, d_image=8)
    prompts = [f"A user viewed: red shoes; blue hat.\nCandidate item: item {i}\nWill the user view it next? Answer "
               "yes or no." for i in range(64)]
    img = torch.randn(64, 1, 8, generator=torch.Generator().manual_seed(0))
    scores = {}
    for device in ("cpu", "cuda"):
        mm = build_multimodal(spec, mcfg, device=device).eval()
        for kv in (False, True):
            t0 = time.perf_counter()
            scores[(device, kv)] = score_yes_no(mm, prompts, img.to(device), batch_size=16, kv_cache=kv)
            secs = round(time.perf_counter() - t0, 3)
            diff = float((scores[(device, kv)] - scores[("cpu", False)]).abs().max())
            rows.append([f"yes/no scorer, {'KV cache' if kv else 'no cache'}", device, secs, f"{diff:.2e}", "–"])
            result[f"scorer_{device}_{'kv' if kv else 'plain'}"] = {"seconds": secs, "max_abs_diff_vs_cpu": diff}
    text = (f"GPU: {result['gpu']}, torch {result['torch']}\n\n" + markdown_table(
        ["check", "device", "seconds", "difference to CPU fp32", "probe valid MRR"], rows) + "\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_smoke.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu_smoke.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
