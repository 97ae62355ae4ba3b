"""Item-embedding throughput of MultimodalLM.embed with the bundled SmolLM2, against this machine's own GEMM peak.

What it measures
----------------
1. GEMM peak: ``torch.matmul`` of two ``n x n`` matrices (default n = 2048), fp32 and bf16, at the torch thread count
   in use; ``GFLOP/s = 2 n^3 / seconds`` (best of ``--gemm-rounds`` rounds of ``--gemm-reps`` products each, after a
   warm-up). This is the reference "100 %".
2. Item embedding: ``MultimodalLM.embed`` (SmolLM2-135M-Instruct, no LoRA, i.e. the base model) on demo-shop items
   (``title. description`` text, about 40-50 tokens of item text), under ``torch.inference_mode()``; items sorted by
   prompt length (longest first) and cut into batches; no logits are computed (``embed`` runs the decoder only).
   Modes: ``text`` (no image features: the learned one-token "missing image" embedding stands in) and ``image``
   (``--image-tokens`` soft tokens, default 32, from a Q-Former-lite over one random 1280-d feature per item).
   Dtypes: ``fp32`` (fp32 weights), ``bf16`` (bf16 weights), ``amp`` (fp32 weights + ``torch.autocast`` bf16).
   Timed: all items once after one warm-up batch; items/s = items / seconds.

FLOP count (per sequence with ``T`` real, non-padding tokens; Kaplan et al. 2020's forward-pass count)::

    FLOPs = 2 * N_nonemb * T  +  2 * n_layers * T^2 * d_model

``N_nonemb`` = parameters of the decoder layers + final norm (no embedding matrix, no LM head: ``embed`` computes no
logits), ``d_model`` = hidden size (the attention term counts QK^T and AV over the causal half of the T x T scores).
Padding tokens are not counted (they are work the machine does but not useful work), nor is the connector (< 1 % of
the LM). Achieved GFLOP/s = FLOPs / seconds; "% peak" divides by the GEMM peak of the same compute dtype (``amp``:
bf16).

Peak memory: the process's peak resident set size (``VmHWM``, reset before each setting through
``/proc/self/clear_refs``; where that is not possible, ``ru_maxrss``, the peak since the process started).

Usage::

    python benchmarks/embed_throughput.py                  # full run: writes benchmarks/results/embed_throughput.md
    python benchmarks/embed_throughput.py --batch-sizes 1,4 --dtypes fp32 --modes text --n-items 8 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
from distillrec.resources import cpu_name, gemm_peak_gflops, reset_peak_rss  # noqa: E402
from distillrec.resources import phase_peak_mb as peak_rss_mb  # noqa: E402  (the peak since the reset)

DEFAULT_OUT = ROOT / "results" / "embed_throughput.md"


def gemm_peak(dtype: torch.dtype, n: int, reps: int, rounds: int) -> float:
    return gemm_peak_gflops(dtype, n, reps, rounds)


# ----------------------------------------------------------------------------------------------------------- the model
def build(dtype: str, n_query: int):
    from distillrec.llm import MultimodalLM, MultimodalLMConfig, load_causal_lm

    wdt = "bfloat16" if dtype == "bf16" else "float32"
    tok, lm = load_causal_lm("smollm2-135m-instruct", wdt)
    cfg = MultimodalLMConfig(d_image=1280, connector="qformer", n_query=n_query, adapters=[], dtype=wdt)
    torch.manual_seed(0)
    mm = MultimodalLM(tok, lm, cfg).eval()
    return mm


def nonembedding_params(mm) -> tuple[int, int, int]:
    dec = mm._decoder()
    n = sum(p.numel() for layer in dec.layers for p in layer.parameters())
    n += sum(p.numel() for p in dec.norm.parameters())
    cfg = mm.lm.config
    return n, int(cfg.num_hidden_layers), int(cfg.hidden_size)


def item_texts(n: int) -> list[str]:
    from distillrec.data.synthetic import make_demo_shop

    ds = make_demo_shop(n_items=max(n, 24), n_users=1, seed=0, write_images=False)
    return [ds.items.item_text(i, ["title", "description"]) for i in range(1, n + 1)]


def run_setting(mm, texts, feats, batch_size: int, dtype: str, n_nonemb: int, n_layers: int, d_model: int) -> dict:
    n = len(texts)
    # prompt lengths (real tokens per item), computed without running the LM
    contents = [mm.item_prompt(t) for t in texts]
    lengths = []
    with torch.inference_mode():
        for k in range(0, n, 32):
            f = None if feats is None else feats[k:k + 32]
            b = mm.encode(contents[k:k + 32], f if f is not None else [None] * len(contents[k:k + 32]))
            lengths += b["attention_mask"].sum(1).tolist()
    order = sorted(range(n), key=lambda i: -lengths[i])
    batches = [order[k:k + batch_size] for k in range(0, n, batch_size)]
    flops = sum(2.0 * n_nonemb * lengths[i] + 2.0 * n_layers * lengths[i] ** 2 * d_model for i in range(n))
    padded = sum(len(bt) * max(lengths[i] for i in bt) for bt in batches)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "amp" else None

    def one(bt):
        f = None if feats is None else feats[bt]
        if amp is not None:
            with amp:
                return mm.embed([texts[i] for i in bt], f)
        return mm.embed([texts[i] for i in bt], f)

    with torch.inference_mode():
        one(batches[0])  # warm-up
        reset_ok = reset_peak_rss()
        t = time.perf_counter()
        for bt in batches:
            out = one(bt)
        dt = time.perf_counter() - t
    assert out["text"].shape[1] == d_model
    return {"items_per_s": n / dt, "seconds": dt, "gflops": flops / dt / 1e9, "tokens": sum(lengths),
            "mean_tokens": sum(lengths) / n, "pad_frac": 1 - sum(lengths) / padded, "peak_rss_mb": peak_rss_mb(),
            "rss_reset": reset_ok}


# --------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--batch-sizes", default="1,4,16,32")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, amp")
    ap.add_argument("--modes", default="text,image", help="comma list of text, image")
    ap.add_argument("--image-tokens", type=int, default=32)
    ap.add_argument("--n-items", type=int, default=64, help="items embedded per setting")
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--gemm-reps", type=int, default=5)
    ap.add_argument("--gemm-rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write the Markdown file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillrec.config import set_num_threads

    set_num_threads(args.threads)
    threads = torch.get_num_threads()
    bss = [int(x) for x in args.batch_sizes.split(",")]
    dtypes = [x.strip() for x in args.dtypes.split(",")]
    modes = [x.strip() for x in args.modes.split(",")]
    for d in dtypes:
        if d not in ("fp32", "bf16", "amp"):
            ap.error(f"unknown dtype {d}")
    t_all = time.perf_counter()

    peaks = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "fp32" or any(d in ("bf16", "amp") for d in dtypes):
            peaks[name] = gemm_peak(dt, args.gemm_n, args.gemm_reps, args.gemm_rounds)
            print(f"GEMM peak {name}: {peaks[name]:.1f} GFLOP/s ({args.gemm_n}x{args.gemm_n}, {threads} threads)",
                  flush=True)

    texts = item_texts(args.n_items)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(args.n_items, 1280, generator=g).abs()  # EfficientNet-like (post-activation) feature scale
    rows = []
    for dtype in dtypes:
        t0 = time.perf_counter()
        mm = build(dtype, args.image_tokens)
        load_s = time.perf_counter() - t0
        n_nonemb, n_layers, d_model = nonembedding_params(mm)
        for mode in modes:
            for bs in bss:
                r = run_setting(mm, texts, img if mode == "image" else None, bs, dtype, n_nonemb, n_layers, d_model)
                peak = peaks["fp32" if dtype == "fp32" else "bf16"]
                r.update(dtype=dtype, mode=mode, batch_size=bs, pct_peak=100 * r["gflops"] / peak, load_s=load_s)
                rows.append(r)
                print(f"{dtype:5s} {mode:5s} batch {bs:3d}: {r['items_per_s']:8.2f} items/s  {r['gflops']:7.1f} "
                      f"GFLOP/s  {r['pct_peak']:5.1f}% of peak  tokens/item {r['mean_tokens']:.0f}  "
                      f"pad {100 * r['pad_frac']:.0f}%  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        del mm

    best = max(rows, key=lambda r: r["pct_peak"])
    cmd = "python benchmarks/embed_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        "# Item-embedding throughput (MultimodalLM.embed, SmolLM2-135M-Instruct)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {threads} torch threads. "
        f"Items: {args.n_items} demo-shop items (title + description), sorted by length, base model (no LoRA), "
        f"`torch.inference_mode()`, no logits. Total time {time.perf_counter() - t_all:.0f} s.",
        "",
        "GEMM peak (torch.matmul " + f"{args.gemm_n}x{args.gemm_n}, best of {args.gemm_rounds}x{args.gemm_reps}): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()) + ".",
        "",
        "FLOPs per item = 2 * N_nonemb * T + 2 * n_layers * T^2 * d_model (T = real prompt tokens, "
        f"N_nonemb = {n_nonemb:,}, n_layers = {n_layers}, d_model = {d_model}); padding and the connector not counted.",
        "",
        "| dtype | input | batch | items/s | tokens/item | padding | GFLOP/s | % of peak | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        inp = "text" if r["mode"] == "text" else f"text + {args.image_tokens} image tokens"
        md.append(f"| {r['dtype']} | {inp} | {r['batch_size']} | {r['items_per_s']:.2f} | {r['mean_tokens']:.0f} | "
                  f"{100 * r['pad_frac']:.0f}% | {r['gflops']:.1f} | {r['pct_peak']:.1f}% | {r['peak_rss_mb']:.0f} |")
    md += ["", f"Best: {best['dtype']}, {best['mode']}, batch {best['batch_size']}: {best['pct_peak']:.1f}% of the "
               f"{'fp32' if best['dtype'] == 'fp32' else 'bf16'} GEMM peak ({best['items_per_s']:.2f} items/s). "
               "Target: at least 40%.", ""]
    text = "\n".join(md)
    print()
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"peaks": peaks, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
