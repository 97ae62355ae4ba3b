"""TPAD efficiency: one-time item embedding + per-session downstream scoring, against an LLM-centric scorer.

The paper's efficiency claim, measured in one process on the same data, the same (possibly layer-truncated) LM and
the same device and torch thread count:

1. One-time embedding. The final Knowledge tower of a finished ``distillrec tpad`` run (``<tpad-run>/model``, loaded
   exactly as ``distillrec embed`` loads it) runs ``MultimodalLM.embed`` over ALL items of the TPAD run's dataset in
   batches of the run's ``embed_batch_size``, items sorted longest prompt first (``embed_items``' order), under
   ``torch.inference_mode()``, after one untimed warm-up batch. Timed: the ``embed`` calls only (not LM loading,
   dataset loading, the frozen image-encoder features, which both sides read as precomputed inputs, or file
   writing). The result is checked against the run's stored ``<tpad-run>/embeddings`` (``max |diff|``), so the
   timed model is the one that made the features. The run's own end-to-end ``embed`` stage time (LM load + writing
   included) is reported beside it when its ``report.json`` has it.
2. TPAD -> downstream per session. The best checkpoint of the first seed of a finished ``distillrec train`` run that
   consumes the TPAD features (``TrainedRecommender.from_run``), for each of ``--sessions`` test sessions drawn with
   a fixed seed: ``model.score`` of that one session (batch of 1, the last ``train.max_len`` items) over the full
   catalogue + top-10, under ``torch.no_grad()`` (as ``TrainedRecommender.recommend``), after one untimed warm-up
   call. Item embeddings are already computed (step 1), so this is all a served request costs.
3. LLM-centric per session. The same MultimodalLM with the Knowledge adapter scores EVERY catalogue item as a
   candidate for the session, one prompt per candidate: the titles of the session's last ``--context-items`` items
   (default 5), the candidate's item prompt (its image soft tokens + its text, as in TPAD) and a yes/no question;
   score = logit("yes") - logit("no") at the last position (the LM head runs on that position only). Candidates are
   batched by ``--llm-batch`` (left padding, longest first). Two variants: (a) no KV cache, every candidate prompt
   is a full forward pass, as an LLM-centric scorer like MLLM-MSR does per candidate; (b) the token prefix all of
   a session's candidate prompts share runs once and its key/value cache serves every batch, which runs only its
   candidates' own tokens (same scores up to rounding; the max difference is reported). Timed, for each: the
   whole catalogue per session, for the first ``--llm-sessions`` of the sessions above, after one untimed warm-up
   batch; median reported. The adapter was never trained for this question, so these scores measure cost, not
   quality.
4. Ratios. ``LLM / TPAD per session`` = LLM median seconds per session / downstream median seconds per session.
   ``amortised`` = LLM median / (downstream median + embedding seconds / number of test sessions of the dataset),
   i.e. the one-time embedding spread over every test session of the downstream dataset.

Usage::

    python benchmarks/tpad_speed.py --tpad-run runs/tpad/demo --downstream-run runs/demo/dimo-tpad
    python benchmarks/tpad_speed.py --tpad-run R --downstream-run D --sessions 5 --llm-sessions 1 --threads 1

Writes ``<out>.md`` and ``<out>.json`` (default ``benchmarks/results/tpad_speed``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from embed_throughput import cpu_name  # noqa: E402  (one definition, shared by the benchmarks)
DEFAULT_OUT = ROOT / "results" / "tpad_speed"
KNOWLEDGE = "knowledge"
SESSION_SEED = 0
QUESTION = "Will the user view the candidate item next? Answer yes or no."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------ loading
def load_tpad(tpad_run: Path, device: str):
    """``(tpad config, dataset, MultimodalLM (eval), texts, image matrix or None, has_image or None)`` of a finished
    TPAD run: the model is built exactly as ``embed_with_knowledge_tower`` builds it for ``distillrec embed``."""
    from distillrec.data.loaders import load_dataset
    from distillrec.features.cache import item_feature_matrix
    from distillrec.methods.tpad.config import TPADConfig
    from distillrec.training.embed import EmbedConfig, build_model, effective_multimodal_config

    cfg = TPADConfig(**json.loads((tpad_run / "config.json").read_text()))
    model_dir = tpad_run / "model"
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} not found: {tpad_run} is not a finished `distillrec tpad` run")
    ecfg = EmbedConfig(dataset=cfg.dataset, lm=cfg.lm, device=device, pretrained=str(model_dir), adapter=KNOWLEDGE,
                       image_features=cfg.image_features if cfg.use_image else None,
                       text_fields=cfg.text_fields if cfg.use_text else [], batch_size=cfg.embed_batch_size,
                       progress=False)
    ds = load_dataset(cfg.dataset)
    items = ds.items
    n = items.n_items
    texts = [""] + [items.item_text(i, ecfg.text_fields) if ecfg.text_fields != [] else "" for i in range(1, n + 1)]
    image = item_feature_matrix(ecfg.image_features, items, False)
    has_image = None if image is None else np.asarray(image.any(-1))
    mm = build_model(ecfg, effective_multimodal_config(ecfg, None if image is None else int(image.shape[1])))
    return cfg, ds, mm, texts, image, has_image


def embedding_order(mm, texts: list[str], has_image: np.ndarray | None) -> np.ndarray:
    """Internal item ids 1..n, longest prompt first (ties by id): ``embed_items``' order."""
    from distillrec.training.embed import prompt_lengths

    lengths = prompt_lengths(mm, texts[1:], None if has_image is None else has_image[1:])
    return np.argsort(-lengths, kind="stable") + 1


def _image_batch(image: np.ndarray | None, has_image: np.ndarray | None, items: np.ndarray):
    if image is None:
        return None, None
    return torch.from_numpy(image[items]), torch.from_numpy(has_image[items])


# ------------------------------------------------------------------------------------------ 1. one-time embedding
@torch.inference_mode()
def time_embedding(mm, texts, image, has_image, order: np.ndarray, batch_size: int) -> tuple[float, dict]:
    """Seconds to embed every item with the Knowledge tower (after one warm-up batch) and the embeddings."""
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    def one(b):
        img, mask = _image_batch(image, has_image, b)
        return mm.embed([texts[i] for i in b], image_features=img, image_mask=mask, adapter=KNOWLEDGE)

    one(batches[0])  # warm-up
    _sync(mm.device)
    n = len(texts)
    out = {k: torch.zeros(n, mm.hidden_size) for k in ("image", "text")}
    t0 = time.perf_counter()
    for b in batches:
        o = one(b)
        for k in out:
            out[k][torch.from_numpy(b)] = o[k].float().cpu()
    _sync(mm.device)
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------------------------------------- 3. the LLM scorer
def session_names(ds, session: np.ndarray, context_items: int, texts: list[str]) -> list[str]:
    """Titles of the session's last ``context_items`` items (the first 60 characters of the item text without a
    title field), oldest first."""
    titles = ds.items.text.get("title")
    last = [int(i) for i in session[-context_items:]] if context_items else []
    return [(titles[i - 1] if titles else texts[i][:60]) or texts[i][:60] for i in last]


def candidate_prompts(mm, names: list[str], texts: list[str], candidates: np.ndarray) -> list[str]:
    """One user-turn content per candidate: session titles + the candidate's item prompt + the yes/no question."""
    viewed = "; ".join(mm._clean(t) for t in names) or "nothing yet"
    instruction = f"A user viewed these items, most recent last: {viewed}.\nCandidate item:"
    return [mm.item_prompt(texts[i], instruction) + "\n" + QUESTION for i in candidates]


@torch.inference_mode()
def llm_session_scores(mm, ds, texts: list[str], image: np.ndarray | None, has_image: np.ndarray | None,
                       session: np.ndarray, *, context_items: int = 5, batch_size: int = 32,
                       order: np.ndarray | None = None, adapter: str = KNOWLEDGE, kv_cache: bool = False,
                       stats: dict[str, Any] | None = None) -> torch.Tensor:
    """LLM-centric scores of EVERY catalogue item for one session: ``[n_items + 1]`` float32, column 0 (padding)
    ``-inf``, item ``i`` = logit("yes") - logit("no") at the last position of its candidate prompt,
    ``batch_size`` candidates per pass. ``kv_cache=False``: one full forward pass per candidate. ``kv_cache=True``:
    the token prefix all candidate prompts share (chat header + session titles) runs once per session and its
    key/value cache is reused by every batch, which then runs only its candidates' own tokens (the same scores up to
    float rounding). ``stats``, when given, receives ``tokens`` (prompt tokens run through the LM, all candidates),
    ``candidates`` and ``prefix_tokens`` (0 without the cache)."""
    from distillrec.llm.scoring import score_yes_no

    n = len(texts) - 1
    order = np.arange(1, n + 1) if order is None else np.asarray(order)
    names = session_names(ds, session, context_items, texts)
    img, mask = _image_batch(image, has_image, order)
    scores = torch.full((n + 1,), -torch.inf)
    scores[torch.from_numpy(order)] = score_yes_no(mm, candidate_prompts(mm, names, texts, order), img, mask,
                                                   adapter=adapter, batch_size=batch_size, kv_cache=kv_cache,
                                                   stats=stats)
    return scores


# ----------------------------------------------------------------------------------------------- the benchmark
def draw_sessions(ds, n: int) -> np.ndarray:
    """Row indices of ``n`` test examples (without replacement, fixed seed, in drawn order)."""
    rng = np.random.default_rng(SESSION_SEED)
    return rng.choice(len(ds.test), size=min(n, len(ds.test)), replace=False)


def _rank(scores: torch.Tensor, target: int) -> int:
    """0-based pessimistic rank of ``target`` (ties count against it)."""
    return int((scores >= scores[target]).sum()) - 1


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tpad-run", type=Path, required=True, help="a finished `distillrec tpad` run folder")
    ap.add_argument("--downstream-run", type=Path, required=True,
                    help="a finished `distillrec train` run of a model that consumes the TPAD features")
    ap.add_argument("--sessions", type=int, default=20, help="test sessions timed for the downstream model")
    ap.add_argument("--llm-sessions", type=int, default=2, help="of those, sessions scored by the LLM (slow)")
    ap.add_argument("--llm-batch", type=int, default=32, help="candidate prompts per LLM forward pass")
    ap.add_argument("--context-items", type=int, default=5, help="session titles in each LLM candidate prompt")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--device", default="cpu", help="device of both the LM and the downstream model")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output prefix: writes PREFIX.md and PREFIX.json")
    ap.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.llm_sessions < 1 or args.llm_batch < 1 or args.context_items < 0:
        ap.error("--sessions, --llm-sessions and --llm-batch must be >= 1, --context-items >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillrec.config import set_num_threads

    set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    cmd = "python benchmarks/tpad_speed.py " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    t_all = time.perf_counter()

    # ---- models and data
    from distillrec.data.batching import pad_histories
    from distillrec.serving.recommend import TrainedRecommender
    from distillrec.training.embed import load_item_embeddings

    cfg, ds, mm, texts, image, has_image = load_tpad(args.tpad_run, args.device)
    rec = TrainedRecommender.from_run(args.downstream_run)
    if rec.dataset.items.ids != ds.items.ids:
        raise SystemExit(f"the downstream run's dataset '{rec.dataset.name}' ({rec.dataset.n_items} items) is not "
                         f"the TPAD run's ('{ds.name}', {ds.n_items} items): item ids differ")
    model = rec.model.to(device).eval()
    feats = list(rec.config.model.params.get("features", []) or [])
    notes = []
    if not any(str(f).startswith("tpad") for f in feats):
        notes.append(f"the downstream model's features {feats} include no tpad_* feature: it does not consume "
                     "the TPAD embeddings")
    n_items = ds.n_items
    n_layers = len(mm._decoder().layers)
    rows = draw_sessions(rec.dataset, args.sessions)
    n_test = len(rec.dataset.test)

    # ---- 1. one-time embedding
    order = embedding_order(mm, texts, has_image)
    embed_s, emb = time_embedding(mm, texts, image, has_image, order, cfg.embed_batch_size)
    stored, _, _ = load_item_embeddings(args.tpad_run / "embeddings")
    embed_diff = max(float((emb[k] - stored[k]).abs().max()) for k in ("image", "text"))
    report_path = args.tpad_run / "report.json"
    run_embed_s = None
    if report_path.is_file():
        run_embed_s = json.loads(report_path.read_text()).get("seconds", {}).get("embed")
    print(f"embedding: {n_items} items in {embed_s:.2f} s ({n_items / embed_s:.1f} items/s), "
          f"max |diff| vs stored {embed_diff:.2e}", flush=True)

    # ---- 2. TPAD -> downstream per session
    max_len = rec.config.train.max_len

    def batch_of(r: int) -> dict[str, torch.Tensor]:
        h, lengths = pad_histories([rec.dataset.test.histories[r]], max_len)
        return {"history": h.to(device), "lengths": lengths.to(device)}

    down_ms, down_ranks = [], []
    with torch.no_grad():
        model.score(batch_of(int(rows[0])))  # warm-up (builds cached item tables)
        for r in rows:
            b = batch_of(int(r))
            _sync(device)
            t0 = time.perf_counter()
            scores = model.score(b)[0].float()
            scores[0] = -torch.inf
            torch.topk(scores, min(10, n_items))
            _sync(device)
            down_ms.append(1000 * (time.perf_counter() - t0))
            down_ranks.append(_rank(scores.cpu(), int(rec.dataset.test.targets[r])))
    down_med, down_p90 = float(np.median(down_ms)), float(np.percentile(down_ms, 90))
    print(f"downstream ({rec.config.model.name}): median {down_med:.2f} ms, p90 {down_p90:.2f} ms per session "
          f"over {len(rows)} sessions", flush=True)

    # ---- 3. LLM-centric per session
    llm_rows = rows[: args.llm_sessions]
    llm_session_scores(mm, ds, texts, image, has_image, rec.dataset.test.histories[int(llm_rows[0])],  # warm-up
                       context_items=args.context_items, batch_size=args.llm_batch, order=order[: args.llm_batch])
    def time_llm(kv_cache: bool) -> dict[str, Any]:
        secs, ranks, prompt_tokens, prefix = [], [], [], []
        last = None
        for r in llm_rows:
            session = rec.dataset.test.histories[int(r)]
            _sync(mm.device)
            t0 = time.perf_counter()
            stats: dict[str, Any] = {}
            last = llm_session_scores(mm, ds, texts, image, has_image, session, context_items=args.context_items,
                                      batch_size=args.llm_batch, order=order, kv_cache=kv_cache, stats=stats)
            _sync(mm.device)
            secs.append(time.perf_counter() - t0)
            ranks.append(_rank(last, int(rec.dataset.test.targets[r])))
            prompt_tokens.append(stats["tokens"] / stats["candidates"])
            prefix.append(stats["prefix_tokens"])
            print(f"LLM scorer{' (prefix KV cache)' if kv_cache else ''}: session {len(secs)}/{len(llm_rows)}: "
                  f"{secs[-1]:.2f} s for {n_items} candidates", flush=True)
        med = float(np.median(secs))
        return {"sessions": len(llm_rows), "median_s": med, "per_candidate_ms": 1000 * med / n_items,
                "seconds": secs, "batch_size": args.llm_batch, "context_items": args.context_items,
                "mean_prompt_tokens": float(np.mean(prompt_tokens)), "kv_cache_of_session_prefix": kv_cache,
                "mean_prefix_tokens": float(np.mean(prefix)), "adapter": KNOWLEDGE, "target_ranks": ranks,
                "scores_per_session": int(torch.isfinite(last[1:]).sum()) if last is not None else 0,
                "_last_scores": last}

    llm, llm_kv = time_llm(False), time_llm(True)
    llm_scores = llm.pop("_last_scores")
    llm_kv_scores = llm_kv.pop("_last_scores")
    llm_med = llm["median_s"]
    ratio = llm_med / (down_med / 1000)
    amortised_tpad_s = down_med / 1000 + embed_s / n_test
    ratio_amortised = llm_med / amortised_tpad_s

    result: dict[str, Any] = {
        "command": cmd,
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs" if device.type == "cpu"
        else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "device": str(device),
        "threads": threads,
        "dataset": ds.name,
        "items": n_items,
        "test_sessions": n_test,
        "lm": cfg.lm.name,
        "lm_layers": n_layers,
        "lm_dtype": cfg.lm.dtype,
        "tpad_run": str(args.tpad_run),
        "downstream_run": str(args.downstream_run),
        "downstream_model": rec.config.model.name,
        "downstream_features": feats,
        "embedding": {"seconds": embed_s, "items_per_s": n_items / embed_s, "batch_size": cfg.embed_batch_size,
                      "max_abs_diff_vs_stored": embed_diff, "run_embed_stage_seconds": run_embed_s,
                      "method": "MultimodalLM.embed over all items in batches, longest first, after a warm-up "
                                "batch; LM load, dataset, image-encoder features and file writing not timed"},
        "downstream": {"sessions": len(rows), "median_ms": down_med, "p90_ms": down_p90, "ms": down_ms,
                       "max_len": max_len, "target_ranks": down_ranks},
        "llm": llm,
        "llm_kv": llm_kv,
        "kv_max_abs_score_diff": float((llm_scores[1:] - llm_kv_scores[1:]).abs().max()),
        "ratio_llm_over_tpad": ratio,
        "ratio_llm_kv_over_tpad": llm_kv["median_s"] / (down_med / 1000),
        "amortised": {"tpad_seconds_per_session": amortised_tpad_s, "ratio_llm_over_tpad": ratio_amortised,
                      "ratio_llm_kv_over_tpad": llm_kv["median_s"] / amortised_tpad_s,
                      "how": f"downstream median + embedding seconds / {n_test} test sessions of the dataset"},
        "session_rows": [int(r) for r in rows],
        "notes": notes,
        "total_seconds": time.perf_counter() - t_all,
    }
    result["_last_llm_scores"] = llm_scores
    text = render_markdown(result)
    print()
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        md, js = Path(f"{args.out}.md"), Path(f"{args.out}.json")
        md.write_text(text)
        js.write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=1))
        print(f"wrote {md} and {js}")
    return result


def _x(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def render_markdown(r: dict[str, Any]) -> str:
    e, d, m, mk, a = r["embedding"], r["downstream"], r["llm"], r["llm_kv"], r["amortised"]
    run_e = f" (the TPAD run's own embed stage, LM load and writing included: {e['run_embed_stage_seconds']} s)" \
        if e["run_embed_stage_seconds"] is not None else ""
    lines = [
        "# TPAD efficiency: one-time embedding + downstream scoring vs an LLM-centric scorer",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}, torch {r['torch']}, device {r['device']}, {r['threads']} torch threads. "
        f"Dataset `{r['dataset']}` ({r['items']} items, {r['test_sessions']} test sessions). LM `{r['lm']}` "
        f"({r['lm_layers']} decoder layers, {r['lm_dtype']}), Knowledge adapter. Downstream: `{r['downstream_model']}` "
        f"(features {r['downstream_features']}), best checkpoint of its first seed. Total time "
        f"{r['total_seconds']:.0f} s.",
        "",
        "| items | LM (layers) | threads | embed all items (s) | items/s | downstream median (ms/session) | "
        "downstream p90 (ms/session) | LLM median (s/session) | LLM ms/candidate | LLM / TPAD per session | "
        "LLM / TPAD amortised |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['items']} | {r['lm']} ({r['lm_layers']}) | {r['threads']} | {e['seconds']:.2f} | "
        f"{e['items_per_s']:.1f} | {d['median_ms']:.2f} | {d['p90_ms']:.2f} | {m['median_s']:.2f} | "
        f"{m['per_candidate_ms']:.2f} | {_x(r['ratio_llm_over_tpad'])} | {_x(a['ratio_llm_over_tpad'])} |",
        "",
        "The LLM-centric scorer with and without a key/value cache of the prompt prefix that every candidate of a "
        "session shares:",
        "",
        "| LLM-centric scorer | tokens run per candidate | median (s/session) | ms/candidate | LLM / TPAD per session "
        "| LLM / TPAD amortised |",
        "|---|---|---|---|---|---|",
        f"| every candidate prompt in full | {m['mean_prompt_tokens']:.0f} | {m['median_s']:.2f} | "
        f"{m['per_candidate_ms']:.2f} | {_x(r['ratio_llm_over_tpad'])} | {_x(a['ratio_llm_over_tpad'])} |",
        f"| shared session prefix ({mk['mean_prefix_tokens']:.0f} tokens) run once, KV-cached | "
        f"{mk['mean_prompt_tokens']:.0f} | {mk['median_s']:.2f} | {mk['per_candidate_ms']:.2f} | "
        f"{_x(r['ratio_llm_kv_over_tpad'])} | {_x(a['ratio_llm_kv_over_tpad'])} |",
        "",
        f"- Embedding (one time): `MultimodalLM.embed` over all {r['items']} items in batches of {e['batch_size']}, "
        f"longest prompt first, after one warm-up batch; LM load, dataset, frozen image-encoder features and file "
        f"writing not timed{run_e}. Max |diff| against the run's stored embeddings: "
        f"{e['max_abs_diff_vs_stored']:.1e}.",
        f"- Downstream: `score` for one session at a time (batch 1, last {d['max_len']} items, full ranking over all "
        f"items + top-10, `torch.no_grad()`), {d['sessions']} test sessions drawn with seed {SESSION_SEED}, after one "
        "warm-up call; item embeddings already computed.",
        f"- LLM-centric: the same LM + Knowledge adapter scores every item as a candidate, one prompt per candidate "
        f"(titles of the session's last {m['context_items']} items + the candidate's item prompt with its image "
        f"tokens + \"{QUESTION}\"; about {m['mean_prompt_tokens']:.0f} tokens), score = logit(yes) - logit(no) at "
        f"the last position, {m['batch_size']} candidates per forward pass, median over {m['sessions']} sessions "
        "(the first of the downstream sessions). The main table's scorer has no KV cache: every candidate is a "
        "full forward pass, as an LLM-centric scorer (MLLM-MSR style) does per candidate. The cached scorer runs "
        "the shared prefix once per session and only each candidate's own tokens after it (max |score diff| "
        f"against the uncached scorer: {r['kv_max_abs_score_diff']:.1e}). The adapter was never trained for this "
        "question: the scores measure cost, not quality.",
        f"- Amortised: LLM median / ({d['median_ms']:.2f} ms + {e['seconds']:.2f} s / {r['test_sessions']} test "
        f"sessions) = LLM median / {1000 * a['tpad_seconds_per_session']:.2f} ms.",
    ]
    lines += [f"- Note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
    sys.exit(0)
