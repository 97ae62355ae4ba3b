"""MLLM-MSR end to end (see the package docstring): image summaries -> preference summaries -> LoRA yes/no SFT ->
ranking the same sampled candidates as the baselines (and re-ranking a run's top-N inside full ranking)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.dataset import Dataset
from ...data.loaders import load_dataset
from ...errors import ConfigError
from ...evaluation.candidates import (
    CandidateSet,
    candidate_metrics,
    per_row_candidate_metrics,
    rerank_ranks,
    sample_candidates,
    top_n_items,
)
from ...evaluation.metrics import mean_ci, mean_metrics, metrics_from_ranks, paired_test
from ...files import atomic_save_tensors, atomic_write_text, folder_fingerprint, folder_lock, prepare_out
from ...llm.builder import build_multimodal, multimodal_config
from ...llm.multimodal import MultimodalLM
from ...llm.scoring import p_yes, score_yes_no
from ...runs import load_trained, score_run_on_candidates
from ...training.distributed import init_distributed
from ...training.stages import Stage, autocast_context
from .config import ADAPTER, RESERVED_BY, STAGES, MLLMMSRConfig, load_mllm_msr_config
from .data import MSRData
from .report import render_markdown
from .summaries import GenerationCost, SummaryCache, generate_cached, image_key, preference_summaries

REPORT_FORMAT = 1
STAGE_ID = 0x45A
COLD_MAX = 4  # cold targets: seen at most this often in training (as in the TPAD tables)
# what a run writes into its folder: --restart removes these and nothing else
OUTPUTS = ("config.json", "candidates", "summaries", "recommender", "scores", "report.json", "report.md")
# what the recommender's weights do not depend on (left out of its stage key)
_NOT_IN_KEY = {"num_threads", "device", "progress", "out", "baselines", "rerank", "rerank_top_n", "save_every",
               "summary_batch_size", "summary_dir", "kv_cache", "eval_users", "n_negatives", "zero_shot"}


def build_model(cfg: MLLMMSRConfig, d_image: int, *, summariser: bool = False) -> MultimodalLM:
    """The recommender: the LM (``multimodal.num_layers``) with one LoRA adapter (``recommender``) and the aligned
    connector, everything but LoRA frozen. ``summariser``: the LM with ``summariser_num_layers`` and no LoRA."""
    if summariser:
        block = {**cfg.multimodal, "num_layers": cfg.summariser_num_layers}
        mcfg = multimodal_config(cfg.lm, block, reserved_by=RESERVED_BY, d_image=d_image, adapters=[])
    else:
        mcfg = multimodal_config(cfg.lm, cfg.multimodal, reserved_by=RESERVED_BY, d_image=d_image, adapters=[ADAPTER])
    mm = build_multimodal(cfg.lm, mcfg, device=cfg.device, seed=cfg.seed)
    if cfg.connector is not None:
        try:
            mm.load_connector(cfg.connector)
        except ValueError as e:
            raise ConfigError(f"connector: {e}") from None
    elif cfg.summarises_images and not cfg.allow_unaligned_connector:
        raise ConfigError("connector: image summaries need a connector aligned on image -> item text; run "
                          "`distillrec align <recipe>` and set connector: <its out>/connector (or image_summary: "
                          "false for the summary-free ablation)")
    for p in (*mm.connector.parameters(), mm.missing_image, mm.special_embed.weight):
        p.requires_grad_(False)
    if not summariser:
        mm.use_adapter(ADAPTER)
    mm.eval()
    return mm


def lm_model_id(cfg: MLLMMSRConfig, mm: MultimodalLM, with_connector: bool) -> str:
    """What a generated text depends on besides its prompt (the cache key)."""
    parts = [cfg.lm.name, cfg.lm.dtype, f"layers={mm.config.num_layers}", f"chat={mm._uses_chat()}",
             f"system={mm.config.system_prompt}", f"autocast={cfg.autocast}"]
    if with_connector:
        parts.append("connector=" + (folder_fingerprint(cfg.connector)[:16] if cfg.connector else f"seed{cfg.seed}"))
    return "|".join(parts)


@torch.no_grad()
def score_rows(mm: MultimodalLM, data: MSRData, preferences: Sequence[str], items: np.ndarray, cfg: MLLMMSRConfig, *,
               adapter: str, cost: dict[str, Any] | None = None, desc: str = "score") -> np.ndarray:
    """p(yes) / (p(yes) + p(no)) of every row's candidates ``items[r]``; one user's candidates per batch, so that with
    ``kv_cache`` the shared prefix (instruction + that user's preference) runs once."""
    from tqdm.auto import tqdm

    was = mm.training
    mm.eval()
    out = np.zeros(items.shape, dtype=np.float32)
    tokens = prefix = 0
    t0 = time.perf_counter()
    for r in tqdm(range(len(items)), desc=desc, unit="user", disable=not cfg.progress, dynamic_ncols=True):
        cand = [int(i) for i in items[r]]
        prompts = [data.recommend_prompt(preferences[r], i) for i in cand]
        img, mask = data.images(cand)
        stats: dict[str, Any] = {}
        with autocast_context(cfg.autocast, mm.device):
            s = score_yes_no(mm, prompts, img, mask, adapter=adapter, batch_size=len(cand), kv_cache=cfg.kv_cache,
                             stats=stats)
        out[r] = p_yes(s).numpy()
        tokens += stats["tokens"]
        prefix += stats["prefix_tokens"]
    mm.train(was)
    if cost is not None:
        cost.update(users=len(items), candidates=int(items.size), tokens=tokens, prefix_tokens=prefix,
                    seconds=round(time.perf_counter() - t0, 2))
    return out


def load_or_sample(path: Path, ds: Dataset, split: str, cfg: MLLMMSRConfig, rows: np.ndarray) -> CandidateSet:
    if path.is_file():
        c = CandidateSet.load(path, ds)
        if c.seed == cfg.seed and c.n_negatives == cfg.n_negatives and np.array_equal(c.rows, rows):
            return c
    c = sample_candidates(ds, split, n_negatives=cfg.n_negatives, seed=cfg.seed, rows=rows)
    c.save(path)
    return c


def summarise_metrics(scores: np.ndarray, cold: np.ndarray) -> dict[str, Any]:
    out = candidate_metrics(scores)
    if cold.any():
        out["cold"] = {k: v for k, v in candidate_metrics(scores[cold]).items()}
    return out


def baseline_results(run_dirs: Sequence[str], cands: CandidateSet, msr_rows: dict[str, np.ndarray],
                     cold: np.ndarray, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each baseline run, every seed, on the same test candidates: mean ± CI over seeds, and paired tests of
    MLLM-MSR against it (per user, the baseline's metric averaged over its seeds)."""
    from ...runs import RunFolder

    results = []
    for run in run_dirs:
        folder = RunFolder(Path(run))
        rc = folder.read_config()
        per_seed, rows = [], []
        for seed in rc.train.seeds:
            s = score_run_on_candidates(run, cands, seed=seed)
            per_seed.append(summarise_metrics(s, cold))
            rows.append(per_row_candidate_metrics(s))
        agg = {k: mean_ci([m[k] for m in per_seed]) for k in per_seed[0] if k not in ("n", "cold")}
        cold_agg = {k: mean_ci([m["cold"][k] for m in per_seed]) for k in per_seed[0].get("cold", {}) if k != "n"}
        paired = {}
        for metric in ("auc", "hr@5", "mrr@5", "ndcg@5"):
            base = np.mean([r[metric] for r in rows], 0)
            paired[metric] = paired_test(msr_rows[metric], base, metric).as_dict()
        log(f"baseline {run}: auc {agg['auc']['mean']:.4f}, hr@5 {agg['hr@5']['mean']:.4f} ({len(per_seed)} seeds)")
        results.append({"run": str(run), "model": rc.model.name, "seeds": rc.train.seeds, "metrics": agg,
                        "cold": cold_agg, "paired_msr_vs_this": paired})
    return results


def rerank_results(cfg: MLLMMSRConfig, mm: MultimodalLM, data: MSRData, preferences: Sequence[str],
                   rows: np.ndarray, log: Callable[[str], None]) -> dict[str, Any]:
    """MLLM-MSR re-ranks the top-N of ``cfg.rerank`` (its first seed) inside full ranking on the test rows."""
    trained = load_trained(cfg.rerank)
    if trained.dataset.fingerprint() != data.ds.fingerprint():
        raise ConfigError(f"rerank: '{cfg.rerank}' was trained on other data (dataset fingerprint "
                          f"{trained.dataset.fingerprint()} != {data.ds.fingerprint()})")
    ex = data.ds.test
    top, base_ranks = top_n_items(trained.model, ex, rows, cfg.rerank_top_n, trained.config.train.max_len)
    cost: dict[str, Any] = {}
    s = score_rows(mm, data, preferences, top, cfg, adapter=ADAPTER, cost=cost, desc="re-rank")
    targets = ex.targets[rows]
    new = rerank_ranks(top, base_ranks, targets, s)
    ks = (5, 10, 20)
    base_m, new_m = metrics_from_ranks(base_ranks, ks), metrics_from_ranks(new, ks)
    paired = {m: paired_test(new_m[m], base_m[m], m).as_dict() for m in ("hr@10", "ndcg@10")}
    log(f"re-rank of {cfg.rerank} top-{cfg.rerank_top_n}: ndcg@10 {base_m['ndcg@10'].mean():.4f} -> "
        f"{new_m['ndcg@10'].mean():.4f}")
    return {"run": cfg.rerank, "model": trained.config.model.name, "seed": trained.seed, "top_n": cfg.rerank_top_n,
            "base": mean_metrics(base_ranks, ks), "reranked": mean_metrics(new, ks), "paired_reranked_vs_base": paired,
            "targets_in_top_n": float((base_ranks < cfg.rerank_top_n).mean()), "cost": cost}


# ------------------------------------------------------------------------------------------------------------- run
def run_mllm_msr(cfg: MLLMMSRConfig | dict, *, stages: Sequence[str] = STAGES, dataset: Dataset | None = None,
                 restart: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stages up to the last one named in ``stages``; returns the report (also ``report.json``/``.md``)."""
    cfg = cfg if isinstance(cfg, MLLMMSRConfig) else MLLMMSRConfig(**cfg)
    cfg.apply()
    last = max(STAGES.index(s) for s in stages)
    t_start = time.perf_counter()
    rank, world = init_distributed()
    out = prepare_out(Path(cfg.out), OUTPUTS, restart=restart, marker="config.json")
    key = cfg.model_dump(mode="json", exclude=_NOT_IN_KEY)
    atomic_write_text(out / "config.json", json.dumps({"config": cfg.model_dump(mode="json"), "key": key}, indent=1))
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    ds = dataset if dataset is not None else load_dataset(cfg.dataset)
    data = MSRData(cfg, ds)
    pairs = data.train_pairs()
    rows = data.eval_rows()
    cands = {s: load_or_sample(out / "candidates" / f"{s}.safetensors", ds, s, cfg, rows) for s in ("valid", "test")}
    counts = ds.item_train_counts()
    cold = {s: counts[cands[s].items[:, 0]] <= COLD_MAX for s in cands}
    seconds["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mm = build_model(cfg, data.d_image, summariser=True)
    seconds["load_lm"] = time.perf_counter() - t0
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "kind": "distillrec.mllm_msr", "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint(), "config": cfg.model_dump(mode="json"),
        "protocol": {"candidates": "sampled", "split": "test", "n_negatives": cfg.n_negatives, "seed": cfg.seed,
                     "users": int(len(rows)), "negatives_from": "items the user never interacted with"},
        "n_train_users": len(pairs.users), "n_train_pairs": int(len(pairs.item)), "n_eval_users": int(len(rows)),
        "stages_run": list(STAGES[:last + 1]), "cost": {},
    }
    histories = {"train": pairs.histories,
                 **{s: [data.history(getattr(ds, s).histories[r]) for r in rows] for s in ("valid", "test")}}

    # 1. image summaries of every item in a summarised history (the frozen LM reading the connector's soft tokens)
    summary_dir = Path(cfg.summary_dir) if cfg.summary_dir else out / "summaries"
    if cfg.summarises_images:
        needed = sorted({i for hs in histories.values() for h in hs for i in h if data.has_image[i]})
        cache = SummaryCache(summary_dir, "items", rank)
        cost = GenerationCost.load(summary_dir / f"items.cost{rank}.json")
        img, _ = data.images(needed)
        keys = [image_key(ds.items.ids[i - 1], img[k]) for k, i in enumerate(needed)]
        with autocast_context(cfg.autocast, mm.device):  # bf16 matmuls: about 2x faster generation on this CPU
            texts = generate_cached(mm, cache, [cfg.image_summary_prompt] * len(needed), lm_model_id(cfg, mm, True),
                                    max_new_tokens=cfg.image_summary_tokens, batch_size=cfg.summary_batch_size,
                                    image_features=list(img), items=keys, cost=cost, rank=rank, world=world,
                                    progress=cfg.progress, desc="image summaries", log=log)
        cost.save(summary_dir / f"items.cost{rank}.json")
        data.image_summaries = dict(zip(needed, texts))
        report["cost"]["image_summaries"] = {**cost.as_dict(), "items": len(needed), "cut_lines": cache.cut_lines}
        report["image_summary_examples"] = [{"item": ds.items.ids[i - 1], "title": data.titles[i], "summary": t}
                                            for i, t in list(data.image_summaries.items())[:5]]
    if last == 0:
        return finish(report, out, t_start, seconds)

    # 2. preference summaries (recurrent over blocks, or direct) of the train, valid and test histories
    cache = SummaryCache(summary_dir, "preferences", rank)
    cost = GenerationCost.load(summary_dir / f"preferences.cost{rank}.json")
    flat = [h for s in ("train", "valid", "test") for h in histories[s]]
    with autocast_context(cfg.autocast, mm.device):
        texts, calls = preference_summaries(
            mm, cache, flat, data.item_line, lm_model_id(cfg, mm, False), mode=cfg.preference,
            block_size=cfg.block_size, first_block=cfg.first_block_prompt, next_block=cfg.next_block_prompt,
            max_new_tokens=cfg.preference_tokens, batch_size=cfg.summary_batch_size, cost=cost, rank=rank,
            world=world, progress=cfg.progress, log=log)
    cost.save(summary_dir / f"preferences.cost{rank}.json")
    prefs: dict[str, list[str]] = {}
    k = 0
    for s in ("train", "valid", "test"):
        prefs[s] = texts[k:k + len(histories[s])]
        k += len(histories[s])
    n_users = len(flat)
    report["cost"]["preferences"] = {**cost.as_dict(), "histories": n_users,
                                     "calls_per_history": round(sum(calls) / max(1, n_users), 3),
                                     "cut_lines": cache.cut_lines}
    report["preference_examples"] = [{"user": u, "history": [data.titles[i] for i in h], "summary": p}
                                     for u, h, p in list(zip(pairs.users, pairs.histories, prefs["train"]))[:3]]
    if last == 1:
        return finish(report, out, t_start, seconds)

    # the recommender LM (its own depth, LoRA) replaces the summariser
    t0 = time.perf_counter()
    del mm
    mm = build_model(cfg, data.d_image)
    seconds["load_lm"] += time.perf_counter() - t0

    # zero-shot: the LM before SFT on the same candidates (the paper's "LLaVA w/o SFT" row)
    scores_dir = out / "scores"
    scores: dict[str, np.ndarray] = {}
    if cfg.zero_shot:
        scores["zero_shot_test"], report["cost"]["scoring_zero_shot"] = cached_scores(
            scores_dir / "zero_shot_test", lambda c: score_rows(mm, data, prefs["test"], cands["test"].items, cfg,
                                                                adapter="base", cost=c, desc="zero-shot test"))

    # 3. LoRA SFT on yes/no, the loss on the answer token only
    stage = Stage("recommender", cfg.recommender, out, key, seed=cfg.seed, stage_id=STAGE_ID,
                  save_every=cfg.save_every, progress=cfg.progress, full_batches=False, autocast=cfg.autocast,
                  device=mm.device)
    params = [p for _, p in mm.trainable_named_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.recommender.lr, weight_decay=cfg.recommender.weight_decay)
    state = stage.load_finished(mm)
    if state is None:
        def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
            u, it, lab = pairs.user[idx], pairs.item[idx], pairs.label[idx]
            prompts = [data.recommend_prompt(prefs["train"][a], int(b)) for a, b in zip(u, it)]
            answers = ["yes" if y else "no" for y in lab]
            img, mask = data.images(it)
            loss = mm.lm_loss(prompts, answers, img, adapter=ADAPTER, image_mask=mask, add_eos=False)
            loss.backward()
            return {"train_loss": float(loss.detach())}

        mm.train()
        state = stage.run(mm, nn.Module(), [opt], len(pairs.item), step, None, log, train_module=mm)
        mm.eval()
    report["recommender"] = {"history": state.get("history", []), "curve": state.get("curve", []),
                             "seconds": state.get("seconds"), "steps": state.get("step"),
                             "trainable_parameters": int(sum(p.numel() for p in params))}
    if last == 2:
        return finish(report, out, t_start, seconds)

    # 4. evaluation on the sampled candidates (valid: for choosing variants; test: reported)
    for s in ("valid", "test"):
        scores[s], report["cost"][f"scoring_{s}"] = cached_scores(
            scores_dir / s, lambda c, s=s: score_rows(mm, data, prefs[s], cands[s].items, cfg, adapter=ADAPTER,
                                                      cost=c, desc=s))
    report["metrics"] = {name: summarise_metrics(sc, cold["valid" if name == "valid" else "test"])
                         for name, sc in scores.items()}
    msr_rows = per_row_candidate_metrics(scores["test"])
    report["baselines"] = baseline_results(cfg.baselines, cands["test"], msr_rows, cold["test"], log)
    if cfg.rerank is not None:
        report["rerank"] = rerank_results(cfg, mm, data, prefs["test"], rows, log)
    return finish(report, out, t_start, seconds)


def cached_scores(stem: Path, compute: Callable[[dict[str, Any]], np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores saved at ``<stem>.safetensors`` (with their cost in ``<stem>.cost.json``), computed once."""
    from safetensors.torch import load_file

    path, cost_path = stem.with_suffix(".safetensors"), stem.with_suffix(".cost.json")
    if path.is_file() and cost_path.is_file():
        return load_file(str(path))["scores"].numpy(), json.loads(cost_path.read_text())
    cost: dict[str, Any] = {}
    scores = compute(cost)
    atomic_save_tensors(path, {"scores": torch.from_numpy(scores)})
    atomic_write_text(cost_path, json.dumps(cost))
    return scores, cost


def finish(report: dict[str, Any], out: Path, t_start: float, seconds: dict[str, float]) -> dict[str, Any]:
    report["seconds"] = {**{k: round(v, 2) for k, v in seconds.items()},
                         "total": round(time.perf_counter() - t_start, 2)}
    report["torch_threads"] = torch.get_num_threads()
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


# ---------------------------------------------------------------------------------------------------------- CLI
def main(config_path: str | Path | dict[str, Any], overrides: Sequence[str] = (), *, stages: Sequence[str] = STAGES,
         out: str | Path | None = None, restart: bool = False) -> dict[str, Any]:
    """``distillrec method mllm_msr CONFIG [--stage S] [--set k=v ...] [--out DIR] [--restart]``."""
    cfg = load_mllm_msr_config(config_path, overrides)
    if out is not None:
        cfg = cfg.model_copy(update={"out": str(out)})
    with folder_lock(cfg.out):  # released when the run returns, not when the process ends
        report = run_mllm_msr(cfg, stages=stages, restart=restart)
    print(render_markdown(report))
    return report
