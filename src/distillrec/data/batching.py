"""Turning sequences and examples into padded tensor batches.

Two training formats, one evaluation format (all right-padded with item 0, items left-aligned, the most recent
``max_len`` items kept):
- causal:  {"history": [B, L], "lengths": [B], "target_seq": [B, L]}  position t predicts target_seq[:, t] (0 = none)
- prefix / eval: {"history": [B, L], "lengths": [B], "target": [B]}
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .dataset import Examples


def pad_histories(histories: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad the last ``max_len`` items of each history; returns (items [B, L], lengths [B])."""
    lengths = np.array([min(len(h), max_len) for h in histories], dtype=np.int64)
    width = max(1, int(lengths.max()) if len(lengths) else 1)
    out = np.zeros((len(histories), width), dtype=np.int64)
    for i, h in enumerate(histories):
        if lengths[i]:
            out[i, : lengths[i]] = h[-lengths[i]:]
    return torch.from_numpy(out), torch.from_numpy(lengths)


def causal_windows(sequences: list[np.ndarray], max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut training sequences into (input, target) windows of at most ``max_len`` positions.

    A sequence s gives inputs s[:-1] and targets s[1:]. Longer sequences are cut into windows that end at every
    ``max_len`` step from the end, so each position keeps up to ``max_len`` items of history except at window
    starts. Windows are what SASRec.pytorch trains on; with right padding and causal models the loss equals the
    prefix-augmented (RecBole) loss for every position whose history fits in one window.
    """
    out = []
    for s in sequences:
        if len(s) < 2:
            continue
        inp, tgt = s[:-1], s[1:]
        end = len(inp)
        while end > 0:
            start = max(0, end - max_len)
            out.append((inp[start:end], tgt[start:end]))
            end = start
    return out


def causal_batch(windows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    width = max(len(w[0]) for w in windows)
    hist = np.zeros((len(windows), width), dtype=np.int64)
    tgt = np.zeros((len(windows), width), dtype=np.int64)
    lengths = np.zeros(len(windows), dtype=np.int64)
    for i, (a, b) in enumerate(windows):
        hist[i, : len(a)] = a
        tgt[i, : len(b)] = b
        lengths[i] = len(a)
    return {"history": torch.from_numpy(hist), "lengths": torch.from_numpy(lengths), "target_seq": torch.from_numpy(tgt)}


def example_batch(examples: Examples, index: np.ndarray, max_len: int) -> dict[str, torch.Tensor]:
    hist, lengths = pad_histories([examples.histories[i] for i in index], max_len)
    return {"history": hist, "lengths": lengths, "target": torch.from_numpy(examples.targets[index])}


def iterate_example_batches(
    examples: Examples, batch_size: int, max_len: int, order: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield (row indices, batch) over ``examples`` in ``order`` (default: as stored)."""
    order = np.arange(len(examples)) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, example_batch(examples, idx, max_len)


def length_bucketed_batches(
    order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator, chunk_batches: int = 50
) -> list[np.ndarray]:
    """Cut a shuffled ``order`` into batches of similar lengths (less padding), then shuffle the batch order.

    Rows are sorted by length within chunks of ``chunk_batches`` batches, so batches stay random in content while
    most of the padding work of right-padded sequences disappears. Deterministic given ``rng``.
    """
    batches = []
    chunk = batch_size * chunk_batches
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]
