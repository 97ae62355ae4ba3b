"""Connector alignment end to end (see the package docstring): data, the frozen LM with a trainable connector, the
training stage (the shared stage loop: resumable, seeded, lr schedule by global step), before/after evaluation and
the report."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.dataset import Dataset
from ...data.loaders import load_dataset
from ...errors import ConfigError
from ...evaluation.report import fmt_number
from ...files import atomic_write_text, folder_lock, prepare_out, write_folder_atomically
from ...llm.builder import build_multimodal, multimodal_config
from ...llm.multimodal import MultimodalLM
from ...training.stages import Stage
from .config import RESERVED_BY, AlignmentConfig, load_alignment_config
from .data import AlignData, keyword_scores
from .report import render_markdown

REPORT_FORMAT = 1
STAGE_ID = 0xE0C  # the stage loop's seed stream for the batch order
# what an alignment run writes into its folder: --restart removes these and nothing else
OUTPUTS = ("train", "connector", "config.json", "before.json", "report.json", "report.md")
# what a result does not depend on (left out of the stage key)
_NOT_IN_KEY = {"num_threads", "device", "progress", "out", "n_examples", "eval_batch_size", "save_every"}


def build_model(cfg: AlignmentConfig, d_image: int) -> MultimodalLM:
    """A MultimodalLM without LoRA on the frozen LM named by ``cfg.lm``, trainable parts seeded by ``cfg.seed``."""
    mcfg = multimodal_config(cfg.lm, cfg.multimodal, reserved_by=RESERVED_BY, d_image=d_image, adapters=[])
    mm = build_multimodal(cfg.lm, mcfg, device=cfg.device, seed=cfg.seed)
    mm.lm.eval()
    mm.special_embed.requires_grad_(False)  # not part of the caption prompt
    return mm


def trainable_parameters(mm: MultimodalLM, with_missing: bool) -> list[torch.nn.Parameter]:
    params = list(mm.connector.parameters())
    if with_missing:
        params.append(mm.missing_image)
    else:
        mm.missing_image.requires_grad_(False)
    return params


def lr_at(cfg: AlignmentConfig, step: int, total: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at ``total``."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine" and total > 0:
        progress = min(1.0, step / max(1, total))
        return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * warm


@torch.no_grad()
def evaluate(mm: MultimodalLM, data: AlignData, cfg: AlignmentConfig, *, generate: bool = True,
             progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Held-out caption loss (token mean) and, with ``generate``, keyword recall / chance / generations."""
    from tqdm.auto import tqdm

    was = mm.connector.training
    mm.connector.eval()
    items = data.heldout_items
    bs = cfg.eval_batch_size
    tot, ntok = 0.0, 0
    gens: list[str] = []
    chunks = [items[k:k + bs] for k in range(0, len(items), bs)]
    bar = tqdm(total=len(chunks) * (2 if generate else 1), desc=desc, disable=not progress, leave=False)
    eos = 1 if mm.tokenizer.eos_token_id is not None else 0
    for chunk in chunks:
        x, mask = data.batch(chunk, mm.device)
        answers = [data.targets[i] for i in chunk]
        loss = mm.lm_loss([cfg.prompt] * len(chunk), answers, image_features=x, image_mask=mask, reduction="sum")
        tot += float(loss)
        ntok += sum(len(mm.tokenizer(a, add_special_tokens=False)["input_ids"]) + eos for a in answers)
        bar.update()
        if generate:
            gens += mm.generate(x, cfg.prompt, max_new_tokens=cfg.max_new_tokens, image_mask=mask)
            bar.update()
    bar.close()
    if was:
        mm.connector.train()
    loss = tot / max(1, ntok)
    out: dict[str, Any] = {"caption_loss": loss, "caption_ppl": math.exp(min(loss, 50.0)), "answer_tokens": ntok}
    if generate:
        kw = [data.keywords[i] for i in items]
        sc = keyword_scores(gens, kw, seed=cfg.seed)
        out.update({"keyword_recall": sc["recall"], "chance": sc["chance"], "p_value": sc["p_value"],
                    "n_keyword_items": sc["n"], "generations": gens})
    return out


# ----------------------------------------------------------------------------------------------------------- run
def pretrain_connector(cfg: AlignmentConfig | dict, *, dataset: Dataset | None = None, restart: bool = False,
                       log=print) -> dict[str, Any]:
    """Run the alignment pretraining described in the package docstring; returns the report (also written to
    ``<out>/report.json`` and ``<out>/report.md``). ``dataset``: use this Dataset instead of loading
    ``cfg.dataset``. A rerun resumes from the run folder's checkpoint; ``restart=True`` starts over."""
    cfg = cfg if isinstance(cfg, AlignmentConfig) else AlignmentConfig(**cfg)
    cfg.apply()
    t_start = time.perf_counter()
    out = prepare_out(Path(cfg.out), OUTPUTS, restart=restart, marker="config.json")
    key = cfg.model_dump(mode="json", exclude=_NOT_IN_KEY)
    stage = Stage("train", cfg, out, key, seed=cfg.seed, stage_id=STAGE_ID, save_every=cfg.save_every,
                  progress=cfg.progress, full_batches=False)
    cfg_path = out / "config.json"
    if cfg_path.is_file() and (stage.dir / "checkpoint").is_dir():
        old = json.loads(cfg_path.read_text()).get("key") or {}
        if old != key:
            diff = sorted(k for k in set(key) | set(old) if old.get(k) != key.get(k))
            raise ConfigError(f"{out} holds checkpoints of another alignment config (differs in {diff}); use "
                              "another --out, or --restart")
    atomic_write_text(cfg_path, json.dumps({"config": cfg.model_dump(mode="json"), "key": key}, indent=1))

    ds = dataset if dataset is not None else load_dataset(cfg.dataset)
    t0 = time.perf_counter()
    data = AlignData(cfg, ds)
    t_features = time.perf_counter() - t0
    if len(data.train_items) == 0 or len(data.heldout_items) < 2:
        raise ConfigError(f"not enough items: {len(data.train_items)} train, {len(data.heldout_items)} held out; "
                          "raise max_items / heldout_frac")
    t0 = time.perf_counter()
    mm = build_model(cfg, data.d_image)
    t_load = time.perf_counter() - t0
    data.set_tokenizer(mm.tokenizer)
    lm_before = {k: v.detach().clone() for k, v in mm.lm.state_dict().items()} if cfg.lm.name == "tiny" else None
    with_missing = cfg.missing_images == "token" and any(data.missing[i] for i in data.train_items)
    params = trainable_parameters(mm, with_missing)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_trainable = sum(p.numel() for p in params)
    n_lm = sum(p.numel() for p in mm.lm.parameters())

    # BEFORE (computed once per run folder)
    before_path = out / "before.json"
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        with torch.random.fork_rng(devices=[]):
            before = evaluate(mm, data, cfg, progress=cfg.progress, desc="before")
        atomic_write_text(before_path, json.dumps(before, indent=1))

    resumed_from = str(stage.dir / "checkpoint") if (stage.dir / "checkpoint" / "stage.json").is_file() else None
    state = stage.load_finished(mm)
    if state is None:
        n_train = len(data.train_items)
        mm.connector.train()

        def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
            chunk = [data.train_items[j] for j in idx]
            x, mask = data.batch(chunk, mm.device)
            loss = mm.lm_loss([cfg.prompt] * len(chunk), [data.targets[i] for i in chunk], image_features=x,
                              image_mask=mask)
            loss.backward()
            return {"train_loss": float(loss.detach())}

        def heldout() -> dict[str, Any]:
            return {"heldout_loss": evaluate(mm, data, cfg, generate=False)["caption_loss"]}

        state = stage.run(mm, nn.Module(), [opt], n_train, step, heldout, log, evaluate_before=False,
                          train_module=mm.connector, lr_at=lambda s, total: lr_at(cfg, s, total))
    history = state.get("history", [])
    t_train = float(state.get("seconds") or 0.0)

    # AFTER
    with torch.random.fork_rng(devices=[]):
        after = evaluate(mm, data, cfg, progress=cfg.progress, desc="after")
    write_folder_atomically(out / "connector", mm.save_trainable)

    lm_unchanged = None
    if lm_before is not None:
        lm_unchanged = all(torch.equal(v, mm.lm.state_dict()[k]) for k, v in lm_before.items())
    examples = []
    for k, i in enumerate(data.heldout_items[: cfg.n_examples]):
        examples.append({"item": ds.items.ids[i - 1], "target": data.targets[i],
                         "keywords": sorted(data.keywords[i]), "before": before["generations"][k],
                         "after": after["generations"][k]})
    strip = {"generations"}
    report = {
        "format": REPORT_FORMAT,
        "kind": "distillrec.connector_alignment",
        "dataset": ds.name,
        "config": cfg.model_dump(mode="json"),
        "lm": cfg.lm.name, "dtype": cfg.lm.dtype, "lm_parameters": n_lm, "trainable_parameters": n_trainable,
        "connector": mm.config.connector, "d_image": data.d_image,
        "n_train": len(data.train_items), "n_heldout": len(data.heldout_items),
        "heldout_items": [ds.items.ids[i - 1] for i in data.heldout_items],
        "common_words_removed": data.common_words,
        "before": {k: v for k, v in before.items() if k not in strip},
        "after": {k: v for k, v in after.items() if k not in strip},
        "history": history,
        "examples": examples,
        "resumed_from": resumed_from,
        "lm_unchanged": lm_unchanged,
        "notes": data.notes,
        "chance_definition": "mean over held-out items i (with category words) of the fraction of other held-out "
                             "items j != i whose category words occur in i's generation",
        "seconds": {"features": round(t_features, 2), "load_lm": round(t_load, 2), "train": round(t_train, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


# ---------------------------------------------------------------------------------------------------------- CLI
def main(config_path: str | Path | dict[str, Any], overrides: Sequence[str] = (), *, out: str | Path | None = None,
         restart: bool = False) -> dict[str, Any]:
    """Entry point for ``distillrec align CONFIG [--set k=v ...] [--out DIR] [--restart]``: run, print the summary
    table, return the report. Resumes from the run folder's checkpoints unless ``restart``."""
    cfg = load_alignment_config(config_path, overrides)
    if out is not None:
        cfg = cfg.model_copy(update={"out": str(out)})
    with folder_lock(cfg.out):  # released when the run returns, not when the process ends
        report = pretrain_connector(cfg, restart=restart)
    b, a = report["before"], report["after"]
    print(f"held-out ({report['n_heldout']} items, {a.get('n_keyword_items')} with category words):")
    for name, x in (("before", b), ("after", a)):
        print(f"  {name + ':':8}caption loss {x['caption_loss']:.4f}, keyword recall "
              f"{fmt_number(x.get('keyword_recall'), 3)} (chance {fmt_number(x.get('chance'), 3)}"
              + (f", p={fmt_number(x.get('p_value'), 4)})" if name == "after" else ")"))
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return report
