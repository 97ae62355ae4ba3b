"""LLMD4Rec end to end (see the package docstring): the plain CRM -> rounds of (CRM candidates, LLM step, teacher
logits, CRM step) -> evaluation of the LLM recommender and of the distilled CRM against the plain one."""

from __future__ import annotations

import json

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.batching import iterate_example_batches
from ...data.dataset import Dataset, Examples
from ...data.loaders import load_dataset
from ...errors import ConfigError
from ...evaluation.candidates import rerank_ranks, top_n_items
from ...evaluation.metrics import mean_ci, mean_metrics, metrics_from_ranks, paired_test, pessimistic_ranks
from ... import resources
from ...files import atomic_save_tensors, atomic_write_text, prepare_out
from ...llm.builder import build_multimodal, multimodal_config
from ...llm.multimodal import MultimodalLM
from ...runs import RunFolder, load_trained
from ...training.distributed import init_distributed
from ...training.stages import Stage, autocast_context, config_key
from ...training.teacher import TeacherLogits, file_sha256
from ...training.trainer import run as train_run
from .config import ADAPTER, ITEM_TEMPLATE, RESERVED_BY, STAGES, LLMD4RecConfig, load_llmd4rec_config
from .data import D4Data
from .model import LLMRecommender, llm_step_loss
from .report import render_markdown

REPORT_FORMAT = 1
STAGE_ID = 0xD40
COLD_MAX = 4  # cold targets: seen at most this often in training (as in the MLLM-MSR and TPAD tables)
KS = (5, 10, 20)
# what a run writes into its folder: --restart removes these and nothing else (a shared plain_dir is not touched)
OUTPUTS = ("config.json", "crm", "llm", "rounds", "eval", "report.json", "report.md")
# what the LLM's weights do not depend on (left out of its stage key)
_NOT_IN_KEY = {"num_threads", "device", "progress", "out", "save_every", "item_batch_size", "score_batch_size",
               "eval_users", "plain_dir", "crm_seeds"}


def peak_rss_mb() -> float:
    # the process's peak, also across the trainer's per-phase resets of the high-water mark
    return round(resources.peak_rss_mb(), 1)


def build_lm(cfg: LLMD4RecConfig) -> MultimodalLM:
    """The LM (``multimodal.num_layers``) with one LoRA adapter, ``recommender``; everything else frozen."""
    block = {"max_text_tokens": 512, **cfg.multimodal}
    mcfg = multimodal_config(cfg.lm, block, reserved_by=RESERVED_BY, d_image=1, adapters=[ADAPTER],
                             item_template=ITEM_TEMPLATE)
    mm = build_multimodal(cfg.lm, mcfg, device=cfg.device, seed=cfg.seed)
    for p in (*mm.connector.parameters(), mm.missing_image, mm.special_embed.weight):
        p.requires_grad_(False)
    mm.use_adapter(ADAPTER)
    mm.eval()
    return mm


# ----------------------------------------------------------------------------------------------------- the CRM
def train_crm(cfg: LLMD4RecConfig, ds: Dataset, out_dir: Path, seeds: list[int],
              teacher: dict[str, Any] | None = None) -> tuple[dict[str, Any], float]:
    """An ordinary ``distillrec train`` run of the CRM (resumed or reused when it exists); (metrics, seconds)."""
    t0 = time.perf_counter()
    metrics = train_run(cfg.crm_run_config(seeds, teacher), out_dir, dataset=ds)
    return metrics, time.perf_counter() - t0


@torch.no_grad()
def crm_outputs(model: nn.Module, examples: Examples, max_len: int, n_candidates: int, top_k: int,
                batch_size: int = 256) -> dict[str, np.ndarray]:
    """For every row: ``candidates`` [N, M+1] (the target, then the model's top-M other items, best first),
    ``logits`` [N, M+1] (the model's scores of them) and ``suggestions`` [N, top_k] (its top-k, the target included
    when it is there). Ties by item id ascending, NaN = -inf."""
    was = model.training
    model.eval()
    n, m = len(examples), n_candidates
    cands = np.zeros((n, m + 1), dtype=np.int64)
    logits = np.zeros((n, m + 1), dtype=np.float32)
    sugg = np.zeros((n, top_k), dtype=np.int64)
    for idx, batch in iterate_example_batches(examples, batch_size, max_len):
        s = model.score(batch).float()
        s[torch.isnan(s)] = -torch.inf
        s[:, 0] = -torch.inf
        order = torch.sort(s[:, 1:], dim=1, descending=True, stable=True).indices[:, : m + 1] + 1
        tgt = batch["target"]
        keep = order != tgt[:, None]
        rest = torch.stack([row[k][:m] for row, k in zip(order, keep)])  # top-M without the target
        c = torch.cat([tgt[:, None], rest], 1)
        cands[idx] = c.numpy()
        logits[idx] = s.gather(1, c).numpy()
        sugg[idx] = order[:, :top_k].numpy()
    model.train(was)
    return {"candidates": cands, "logits": logits, "suggestions": sugg}


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(str(path)).items()}


def crm_param_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def compare_crm_runs(base_dir: str | Path, other_dir: str | Path, ds: Dataset, metric: str = "ndcg@10",
                     cold_max: int = COLD_MAX) -> dict[str, Any]:
    """``other`` against ``base`` (two finished CRM runs on ``ds``): test mean ± 95% CI over seeds of both, the
    paired t and Wilcoxon tests per test user (each user's metric averaged over a run's seeds), the same on the
    cold-target slice (targets seen at most ``cold_max`` times in training), parameter counts and the time of one
    full-ranking pass over the test split (first seed of each)."""
    from ...evaluation.evaluator import rank_examples

    out: dict[str, Any] = {"metric": metric, "cold_max": cold_max}
    counts = ds.item_train_counts()
    cold = counts[ds.test.targets] <= cold_max
    per_run: dict[str, Any] = {}
    for name, d in (("base", base_dir), ("other", other_dir)):
        folder = RunFolder(Path(d))
        m = folder.read_metrics()
        seeds = [s["seed"] for s in m["seeds"]]
        rows = [metrics_from_ranks(folder.read_ranks("test", s), KS) for s in seeds]
        per_seed = {k: [float(r[k].mean()) for r in rows] for k in (metric, "hr@10", "ndcg@10", "ndcg@20")}
        cold_seed = [float(r[metric][cold].mean()) for r in rows] if cold.any() else []
        trained = load_trained(folder.root, seeds[0], ds)
        t0 = time.perf_counter()
        rank_examples(trained.model, ds.test, trained.config.eval, trained.config.train.max_len)
        infer_s = time.perf_counter() - t0
        per_run[name] = {
            "run": str(d), "model": m["model"], "seeds": seeds,
            "test": {k: mean_ci(v) for k, v in per_seed.items()},
            "cold": mean_ci(cold_seed) if cold_seed else None,
            "per_user": np.mean([r[metric] for r in rows], 0),
            "params": crm_param_count(trained.model), "param_shapes": {k: list(v.shape) for k, v in
                                                                       trained.model.state_dict().items()},
            "test_rank_s": round(infer_s, 3), "best_epochs": [s["best_epoch"] for s in m["seeds"]],
        }
    a, b = per_run["other"].pop("per_user"), per_run["base"].pop("per_user")
    out["paired"] = paired_test(a, b, metric).as_dict()
    out["paired_cold"] = paired_test(a[cold], b[cold], metric).as_dict() if cold.any() else None
    out["n_test"], out["n_cold"] = int(len(cold)), int(cold.sum())
    out["same_shapes"] = per_run["base"].pop("param_shapes") == per_run["other"].pop("param_shapes")
    out.update(per_run)
    return out


# ------------------------------------------------------------------------------------------------------ the LLM
def item_table(cfg: LLMD4RecConfig, rec: LLMRecommender, data: D4Data, path: Path,
               log: Callable[[str], None]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The LLM's own item embeddings (frozen LM, one pass per item), cached at ``path``."""
    from safetensors.torch import load_file

    texts = data.item_prompt_texts()
    key = config_key({"lm": cfg.lm.model_dump(mode="json"), "multimodal": cfg.multimodal,
                      "texts": config_key(texts), "instruction": rec.item_instruction})
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return rec.set_items(load_file(str(path))["states"]), json.loads(meta_path.read_text())["cost"]
    t0 = time.perf_counter()
    before = rec.forward_passes
    states = rec.item_states(texts, cfg.item_batch_size, cfg.progress)
    table = rec.set_items(states)
    cost = {"forward_passes": rec.forward_passes - before, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": peak_rss_mb()}
    atomic_save_tensors(path, {"states": states})
    atomic_write_text(meta_path, json.dumps({"key": key, "cost": cost}))
    log(f"item states: {len(data.texts) - 1} items in {cost['seconds']:.1f}s")
    return table, cost


@torch.no_grad()
def llm_states(cfg: LLMD4RecConfig, rec: LLMRecommender, prompts: Sequence[str], desc: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    was = rec.mm.training
    rec.mm.eval()
    out = []
    bs = cfg.score_batch_size
    for s in tqdm(range(0, len(prompts), bs), desc=desc, unit="batch", disable=not cfg.progress,
                  dynamic_ncols=True):
        with autocast_context(cfg.autocast, rec.mm.device):
            out.append(rec.user_states(prompts[s:s + bs]).float().cpu())
    rec.mm.train(was)
    return torch.cat(out) if out else torch.zeros(0, rec.mm.hidden_size)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_same_key(out: Path, key: dict[str, Any]) -> None:
    """A folder holding rounds of another config is refused (its cached candidates, LoRA and teacher logits would
    not be this config's), naming the differing keys."""
    path = out / "config.json"
    if not path.is_file() or not any((out / p).exists() for p in ("llm", "rounds", "eval")):
        return
    try:
        old = json.loads(path.read_text()).get("key", {})
    except ValueError:
        return
    diff = _diff(old, json.loads(json.dumps(key)))
    if diff:
        raise ConfigError(f"'{out}' holds an LLMD4Rec run of another config (differs in {', '.join(diff)}); use "
                          "another --out, or --restart to replace it")


def read_cost(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_cost(path: Path, cost: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(cost, indent=1))


# ------------------------------------------------------------------------------------------------------------- run
def run_llmd4rec(cfg: LLMD4RecConfig | dict, *, stages: Sequence[str] = STAGES, dataset: Dataset | None = None,
                 restart: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stages up to the last one named in ``stages``; returns the report (also ``report.json``/``.md``)."""
    cfg = cfg if isinstance(cfg, LLMD4RecConfig) else LLMD4RecConfig(**cfg)
    cfg.apply()
    last = max(STAGES.index(s) for s in stages)
    t_start = time.perf_counter()
    _, world = init_distributed()
    if world > 1:
        raise ConfigError("llmd4rec runs in one process (its CRM step is the single-process trainer); run it "
                          "without torchrun")
    out = prepare_out(Path(cfg.out), OUTPUTS, restart=restart, marker="config.json")
    key = {**cfg.model_dump(mode="json", exclude=_NOT_IN_KEY), "crm_seed": cfg.crm_seeds[0]}
    check_same_key(out, key)
    atomic_write_text(out / "config.json", json.dumps({"config": cfg.model_dump(mode="json"), "key": key}, indent=1))
    ds = dataset if dataset is not None else load_dataset(cfg.dataset)
    if cfg.n_candidates >= ds.n_items:
        raise ConfigError(f"n_candidates={cfg.n_candidates}: the dataset has {ds.n_items} items; give n_candidates "
                          f"<= {ds.n_items - 1} (the target + that many other items)")
    data = D4Data(cfg, ds)
    seed0 = cfg.crm_seeds[0]
    plain_dir = Path(cfg.plain_dir) if cfg.plain_dir else out / "crm" / "plain"
    distilled_dir = out / "crm" / "distilled"
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "kind": "distillrec.llmd4rec", "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint(), "config": cfg.model_dump(mode="json"),
        "n_distill_rows": int(len(data.rows)), "n_llm_rows": int(len(data.llm_rows)),
        "stages_run": list(STAGES[:last + 1]), "runs": {"plain": str(plain_dir), "distilled": str(distilled_dir)},
        "cost": {},
    }

    # 1. the plain CRM, every seed of crm_seeds: the baseline, and (its first seed) the first round's CRM
    _, secs = train_crm(cfg, ds, plain_dir, cfg.crm_seeds)
    report["cost"]["crm_warmup"] = {"seconds": round(secs, 2), "peak_rss_mb": peak_rss_mb()}
    if last == 0:
        return finish(report, out, t_start)

    # 2. the rounds
    t0 = time.perf_counter()
    mm = build_lm(cfg)
    report["cost"]["load_lm_s"] = round(time.perf_counter() - t0, 2)
    rec = LLMRecommender(mm, ADAPTER, cfg.llm_scale, cfg.user_instruction,
                         cfg.item_instruction if cfg.item_instruction is not None else cfg.user_instruction)
    table, report["cost"]["item_states"] = item_table(cfg, rec, data, out / "llm" / "items.safetensors", log)
    examples = data.distill_examples()
    crm_max_len = cfg.crm_run_config([seed0]).train.max_len
    prev_dir = plain_dir
    rounds_cost = []
    t_rounds = time.perf_counter()
    for r in range(1, cfg.rounds + 1):
        rdir = out / "rounds" / f"round{r}"
        cost_path = rdir / "cost.json"
        cost = read_cost(cost_path)

        # (a) the CRM of the previous round on the distillation rows: candidates, its logits, its top-k
        crm_file = rdir / "crm.safetensors"
        if not crm_file.is_file():
            t0 = time.perf_counter()
            trained = load_trained(prev_dir, seed0, ds)
            o = crm_outputs(trained.model, examples, crm_max_len, cfg.n_candidates, cfg.augment_top_k)
            atomic_save_tensors(crm_file, {k: torch.from_numpy(v) for k, v in o.items()},
                                metadata={"crm_run": str(prev_dir), "seed": str(seed0)})
            cost["crm_candidates"] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": peak_rss_mb()}
            save_cost(cost_path, cost)
        o = load_tensors(crm_file)
        prompts = [data.user_text(h, s) for h, s in zip(examples.histories, o["suggestions"])]
        cands_t, crm_logits_t = torch.from_numpy(o["candidates"]), torch.from_numpy(o["logits"])

        # (b) the LLM step: LoRA, continuing from the previous round, seeded and resumable
        stage = Stage(f"round{r}", cfg.llm, out / "llm", {**key, "round": r}, seed=cfg.seed, stage_id=STAGE_ID + r,
                      save_every=cfg.save_every, progress=cfg.progress, full_batches=False, autocast=cfg.autocast,
                      device=mm.device)
        state = stage.load_finished(mm)
        if state is None:
            if r > 1:
                mm.load_trainable(out / "llm" / f"round{r - 1}" / "final")
            mutual = cfg.direction == "mutual"

            def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
                rows = data.llm_rows[idx]
                u = rec.user_states([prompts[k] for k in rows])
                c = cands_t[rows]
                if cfg.llm_negatives:  # uniform items for the LLM's own loss (the step's seeded rng: resumable)
                    neg = rng.integers(1, ds.n_items + 1, size=(len(rows), cfg.llm_negatives))
                    c = torch.cat([c, torch.from_numpy(neg)], 1)
                s = rec.candidate_scores(u, table, c)
                loss, parts = llm_step_loss(s, crm_logits_t[rows] if mutual else None, lam=cfg.lambda_llm,
                                            temperature=cfg.temperature, weighting=cfg.weighting)
                loss.backward()
                return parts

            params = [p for _, p in mm.trainable_named_parameters()]
            opt = torch.optim.AdamW(params, lr=cfg.llm.lr, weight_decay=cfg.llm.weight_decay)
            mm.train()
            state = stage.run(mm, nn.Module(), [opt], len(data.llm_rows), step, None, log, train_module=mm)
            mm.eval()
            n_rows = len(data.llm_rows)
            spe = cfg.llm.steps_per_epoch
            per_epoch = n_rows if spe is None else min(n_rows, spe * cfg.llm.batch_size)
            cost["llm_step"] = {"seconds": state.get("seconds"), "steps": state.get("step"),
                                "forward_backward_passes": per_epoch * cfg.llm.epochs, "peak_rss_mb": peak_rss_mb()}
            save_cost(cost_path, cost)
        cost.setdefault("llm_curve", state.get("curve", []))

        # (c) the LLM's logits over the same candidates, cached for the CRM step (no LLM pass in the CRM step)
        teacher_file = rdir / "teacher.safetensors"
        if not teacher_file.is_file():
            t0 = time.perf_counter()
            states = llm_states(cfg, rec, prompts, f"teacher logits round {r}")
            z = rec.candidate_scores(states, table, cands_t).numpy()
            TeacherLogits(data.rows, data.positions, o["candidates"], z, ds.fingerprint(),
                          {"teacher": "llmd4rec LLM", "round": r, "lm": cfg.lm.name}).save(teacher_file)
            cost["teacher_logits"] = {"seconds": round(time.perf_counter() - t0, 2), "forward_passes": len(prompts),
                                      "peak_rss_mb": peak_rss_mb()}
            save_cost(cost_path, cost)

        # (d) the CRM step: an ordinary run with train.teacher naming the cached logits
        final = r == cfg.rounds
        crm_dir = distilled_dir if final else out / "crm" / f"round{r}"
        teacher = {"path": str(teacher_file), "weight": cfg.lambda_crm, "temperature": cfg.temperature,
                   "weighting": cfg.weighting, "sha256": file_sha256(teacher_file)}
        if "crm_step" not in cost or not (crm_dir / "metrics.json").is_file():
            metrics, secs = train_crm(cfg, ds, crm_dir, cfg.crm_seeds if final else [seed0], teacher)
            cost["crm_step"] = {"seconds": round(secs, 2), "seeds": len(metrics["seeds"]),
                                "train_s_per_epoch": metrics["timing"]["train_s_per_epoch"],
                                "valid_ndcg@10": metrics["valid"].get("ndcg@10"), "peak_rss_mb": peak_rss_mb()}
            save_cost(cost_path, cost)
        prev_dir = crm_dir
        rounds_cost.append({"round": r, **cost})
        done_s = time.perf_counter() - t_rounds
        log(f"round {r}/{cfg.rounds} done ({done_s:.0f}s so far; about {done_s / r * (cfg.rounds - r):.0f}s left)")
    report["rounds"] = rounds_cost
    report["llm_forward_passes"] = rec.forward_passes  # in this process (a resumed run counts only what it redid)
    if last == 1:
        return finish(report, out, t_start)

    # 3. evaluation: the LLM recommender alone (full catalogue and re-ranking the distilled CRM's top-M, on
    # eval_users rows), and the distilled CRM against the plain one (full ranking, every test user, crm_seeds)
    trained = load_trained(distilled_dir, seed0, ds)
    mask = trained.config.eval.mask_history
    report["llm"] = {}
    for split in ("valid", "test"):
        ex = getattr(ds, split)
        rows = data.eval_rows(split)
        path = out / "eval" / f"llm_{split}.safetensors"
        saved = load_tensors(path) if path.is_file() else None
        if saved is not None and np.array_equal(saved["rows"], rows):  # computed for these rows: reused
            e_cost = read_cost(path.with_suffix(".json"))
        else:
            t0 = time.perf_counter()
            top, base = top_n_items(trained.model, ex, rows, cfg.n_candidates, trained.config.train.max_len)
            pr = [data.user_text(ex.histories[r], top[i]) for i, r in enumerate(rows)]
            states = llm_states(cfg, rec, pr, f"LLM {split}")
            targets = torch.from_numpy(ex.targets[rows])
            full = torch.cat([pessimistic_ranks(rec.full_scores(states[s:s + 256], table), targets[s:s + 256],
                                                _padded(ex, rows[s:s + 256]) if mask else None, mask)
                              for s in range(0, len(rows), 256)]) if len(rows) else torch.zeros(0, dtype=torch.long)
            rr = rerank_ranks(top, base, ex.targets[rows], rec.candidate_scores(states, table, torch.from_numpy(top)))
            saved = {"rows": rows, "full": full.numpy(), "rerank": rr, "crm": base}
            atomic_save_tensors(path, {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in saved.items()})
            e_cost = {"seconds": round(time.perf_counter() - t0, 2), "forward_passes": len(rows),
                      "peak_rss_mb": peak_rss_mb()}
            save_cost(path.with_suffix(".json"), e_cost)
        cold = ds.item_train_counts()[ex.targets[saved["rows"]]] <= COLD_MAX
        res: dict[str, Any] = {"n": int(len(saved["rows"])), "n_cold": int(cold.sum()), "cost": e_cost}
        for name in ("full", "rerank", "crm"):
            res[name] = mean_metrics(saved[name], KS)
            res[f"{name}_cold"] = mean_metrics(saved[name][cold], KS) if cold.any() else {}
        res["paired_rerank_vs_crm"] = paired_test(metrics_from_ranks(saved["rerank"], (10,))["ndcg@10"],
                                                  metrics_from_ranks(saved["crm"], (10,))["ndcg@10"]).as_dict()
        report["llm"][split] = res
    report["crm"] = compare_crm_runs(plain_dir, distilled_dir, ds)
    return finish(report, out, t_start)


def _padded(ex: Examples, rows: np.ndarray) -> torch.Tensor:
    from ...data.batching import pad_histories

    return pad_histories([ex.histories[r] for r in rows], max(1, max(len(ex.histories[r]) for r in rows)))[0]


def finish(report: dict[str, Any], out: Path, t_start: float) -> dict[str, Any]:
    report["seconds_total"] = round(time.perf_counter() - t_start, 2)
    report["peak_rss_mb"] = peak_rss_mb()
    report["torch_threads"] = torch.get_num_threads()
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=_json_default))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


# ---------------------------------------------------------------------------------------------------------- CLI
def main(config_path: str | Path | dict[str, Any], overrides: Sequence[str] = (), *, stages: Sequence[str] = STAGES,
         out: str | Path | None = None, restart: bool = False) -> dict[str, Any]:
    """``distillrec method llmd4rec CONFIG [--stage S] [--set k=v ...] [--out DIR] [--restart]``."""
    cfg = load_llmd4rec_config(config_path, overrides)
    if out is not None:
        cfg = cfg.model_copy(update={"out": str(out)})
    report = run_llmd4rec(cfg, stages=stages, restart=restart)
    print(render_markdown(report))
    return report


__all__ = ["run_llmd4rec", "main", "compare_crm_runs", "crm_outputs"]
