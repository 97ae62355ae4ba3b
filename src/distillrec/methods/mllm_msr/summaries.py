"""MLLM-MSR's text-generation stages: item image summaries and recurrent user-preference summaries, cached on disk.

Every generated text is stored under a key that hashes (model, prompt, generation length), in JSON-lines files that
are appended and flushed batch by batch: a kill loses at most the batch in flight, and a rerun generates only what is
missing (a line cut by the kill is counted and ignored). Under ``torchrun`` each rank generates every ``world``-th
missing prompt into its own file (``<name>.rank<r>.jsonl``); after a barrier every rank reads all files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...files import atomic_write_text
from ...llm.multimodal import MultimodalLM
from ...training.distributed import barrier

NO_HISTORY = "The user has no interaction history yet."


def summary_key(model_id: str, prompt: str, max_new_tokens: int, item: str | None = None) -> str:
    """The cache key of a generated text: model, prompt, length and (for image summaries, whose prompt is the same
    for every item) the item and its image features."""
    return hashlib.sha256(json.dumps([model_id, prompt, max_new_tokens, item]).encode()).hexdigest()[:24]


def image_key(item_id: str, features: torch.Tensor | None) -> str:
    if features is None:
        return item_id
    return item_id + ":" + hashlib.sha256(features.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


class SummaryCache:
    """Generated texts by key, in ``<folder>/<name>.rank<r>.jsonl`` (one file per writing rank)."""

    def __init__(self, folder: Path, name: str, rank: int = 0):
        self.folder, self.name = Path(folder), name
        self.path = self.folder / f"{name}.rank{rank}.jsonl"
        self.texts: dict[str, str] = {}
        self.cut_lines = 0  # lines cut by a kill (ignored; their prompts are generated again)
        self.reload()

    def reload(self) -> None:
        self.texts, self.cut_lines = {}, 0
        for f in sorted(self.folder.glob(f"{self.name}.rank*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.texts[row["key"]] = row["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.cut_lines += 1

    def __contains__(self, key: str) -> bool:
        return key in self.texts

    def __getitem__(self, key: str) -> str:
        return self.texts[key]

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, entries: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:  # a kill may have cut the last line: start on a fresh one
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write("".join(json.dumps({"key": k, "text": v}) + "\n" for k, v in entries.items()).encode())
            fh.flush()
            os.fsync(fh.fileno())
        self.texts.update(entries)


class GenerationCost:
    """LLM calls, tokens and seconds of one generation stage (what the report's cost table shows)."""

    def __init__(self) -> None:
        self.calls = self.prompt_tokens = self.generated_tokens = self.cached = 0
        self.seconds = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "cached": self.cached, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 2)}

    @classmethod
    def load(cls, path: Path) -> GenerationCost:
        """The cost so far of a cache (summed over the runs that filled it; ``cached`` counts this run only)."""
        cost = cls()
        if path.is_file():
            d = json.loads(path.read_text())
            cost.calls, cost.prompt_tokens = d["calls"], d["prompt_tokens"]
            cost.generated_tokens, cost.seconds = d["generated_tokens"], d["seconds"]
        return cost

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.as_dict()))


def generate_cached(mm: MultimodalLM, cache: SummaryCache, prompts: Sequence[str], model_id: str, *,
                    max_new_tokens: int, batch_size: int, image_features: Sequence[torch.Tensor | None] | None = None,
                    items: Sequence[str] | None = None, cost: GenerationCost | None = None, rank: int = 0, world: int = 1, progress: bool = False,
                    desc: str = "generate", log: Callable[[str], None] | None = None) -> list[str]:
    """The greedy generation (LoRA off: the frozen LM) for every prompt, from the cache where it is there. Missing
    prompts run in batches of similar length; each batch is saved before the next starts. ``items`` (one key per
    prompt, :func:`image_key`) tell apart prompts that differ only in their image."""
    from tqdm.auto import tqdm

    keys = [summary_key(model_id, p, max_new_tokens, None if items is None else items[i])
            for i, p in enumerate(prompts)]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    todo = [i for k, i in first.items() if k not in cache]
    if cost is not None:
        cost.cached += len(first) - len(todo)
    mine = sorted(todo[rank::world], key=lambda i: len(prompts[i]))
    t0 = time.perf_counter()
    bar = tqdm(total=len(mine), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    stats: dict[str, int] = {}
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        imgs = None if image_features is None else [image_features[i] for i in idx]
        texts = mm.generate(imgs, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, adapter="base",
                            stats=stats)
        cache.add({keys[i]: t for i, t in zip(idx, texts)})
        bar.update(len(idx))
    bar.close()
    if cost is not None:
        cost.calls += len(mine)
        cost.prompt_tokens += stats.get("prompt_tokens", 0)
        cost.generated_tokens += stats.get("generated_tokens", 0)
        cost.seconds += time.perf_counter() - t0
    if world > 1:
        barrier()
        cache.reload()
    if log is not None and mine:
        log(f"{desc}: {len(mine)} generated, {len(first) - len(todo)} from the cache "
            f"({time.perf_counter() - t0:.0f}s)")
    return [cache[k] for k in keys]


def preference_prompts_direct(histories: Sequence[Sequence[int]], item_line: Callable[[int, int], str],
                              first_block: str) -> list[str]:
    return [first_block.format(items="\n".join(item_line(k + 1, i) for k, i in enumerate(h))) for h in histories]


def preference_summaries(mm: MultimodalLM, cache: SummaryCache, histories: Sequence[Sequence[int]],
                         item_line: Callable[[int, int], str], model_id: str, *, mode: str, block_size: int,
                         first_block: str, next_block: str, max_new_tokens: int, batch_size: int,
                         cost: GenerationCost | None = None, rank: int = 0, world: int = 1, progress: bool = False,
                         log: Callable[[str], None] | None = None) -> tuple[list[str], list[int]]:
    """Each history's preference summary and the number of LLM calls it took.

    ``recurrent`` (the paper's): the history in blocks of ``block_size`` items, the first block's prompt asks for a
    summary, each later one carries the previous summary and asks for an updated one; all users' block ``j`` run
    together. ``direct`` (the MLLM-MSR_R ablation): the whole history in one prompt. An empty history gets a fixed
    sentence without a call."""
    n = len(histories)
    out = [NO_HISTORY] * n
    calls = [0] * n
    if mode == "direct":
        rows = [r for r in range(n) if len(histories[r])]
        prompts = preference_prompts_direct([histories[r] for r in rows], item_line, first_block)
        texts = generate_cached(mm, cache, prompts, model_id, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                cost=cost, rank=rank, world=world, progress=progress, desc="preferences (direct)",
                                log=log)
        for r, t in zip(rows, texts):
            out[r], calls[r] = t, 1
        return out, calls
    blocks = [[list(h[i:i + block_size]) for i in range(0, len(h), block_size)] for h in histories]
    for j in range(max((len(b) for b in blocks), default=0)):
        rows = [r for r in range(n) if len(blocks[r]) > j]
        prompts = []
        for r in rows:
            items = "\n".join(item_line(k + 1, i) for k, i in enumerate(blocks[r][j]))
            prompts.append(first_block.format(items=items) if j == 0 else
                           next_block.format(previous=out[r], items=items))
        texts = generate_cached(mm, cache, prompts, model_id, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                cost=cost, rank=rank, world=world, progress=progress,
                                desc=f"preferences (block {j + 1})", log=log)
        for r, t in zip(rows, texts):
            out[r] = t
            calls[r] += 1
    return out, calls
