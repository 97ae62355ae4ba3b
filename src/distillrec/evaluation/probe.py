"""Transition probes: does an item embedding, by itself, carry the signal a method should have put in it?

:func:`transition_probe` -- next-item retrieval from embeddings alone. For each held-out transition (the last item of
a validation or test history -> its target), the last item's embedding ranks every other item of the catalogue by
similarity; HR@K and MRR of the target (full ranking, pessimistic ties, the query item itself excluded). Similarity is
the cosine after per-column standardisation over the catalogue: LM hidden states carry a few huge, nearly constant
coordinates that would otherwise decide every cosine. Chance: HR@K = K / (n_items - 1). Per-row reciprocal ranks
come back too, for paired tests between two embeddings on the same transitions.

A retrieval number is read against its chance level, never a contrastive loss against ln N: a loss above ln N is
what any uninformative, uncollapsed embedding gives at a low temperature.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.dataset import Dataset, Examples


def held_out_transitions(examples: Examples) -> tuple[np.ndarray, np.ndarray]:
    """``(last history item, target)`` of every row with a non-empty history (int64 arrays)."""
    keep = [i for i, h in enumerate(examples.histories) if len(h)]
    src = np.array([int(examples.histories[i][-1]) for i in keep], dtype=np.int64)
    return src, np.asarray(examples.targets, dtype=np.int64)[keep]


def standardised_unit_rows(emb: np.ndarray) -> np.ndarray:
    """Rows 1..n standardised per column over the items, then scaled to unit length (row 0, padding, stays 0)."""
    x = np.asarray(emb, dtype=np.float64).copy()
    body = x[1:]
    body -= body.mean(0)
    sd = body.std(0)
    body /= np.where(sd > 1e-12, sd, 1.0)
    norm = np.linalg.norm(body, axis=1, keepdims=True)
    body /= np.where(norm > 0, norm, 1.0)
    x[0] = 0.0
    return x.astype(np.float32)


def transition_probe(emb: np.ndarray, src: np.ndarray, dst: np.ndarray, k: int = 10, batch: int = 2048
                     ) -> dict[str, Any]:
    """Next-item retrieval of ``dst`` from ``src`` by embedding similarity over the whole catalogue."""
    z = standardised_unit_rows(emb)
    n = z.shape[0] - 1
    rr = np.zeros(len(src), dtype=np.float64)
    hit = np.zeros(len(src), dtype=bool)
    for s in range(0, len(src), batch):
        q, t = src[s:s + batch], dst[s:s + batch]
        sims = z[q] @ z.T  # [b, n + 1]
        sims[:, 0] = -np.inf
        sims[np.arange(len(q)), q] = -np.inf  # an item does not retrieve itself
        target = sims[np.arange(len(q)), t][:, None]
        rank = (sims >= target).sum(1)  # 1-based, ties counted against the target
        rr[s:s + batch] = 1.0 / rank
        hit[s:s + batch] = rank <= k
    return {f"hr@{k}": float(hit.mean()) if len(hit) else None, "mrr": float(rr.mean()) if len(rr) else None,
            "n": int(len(src)), f"chance_hr@{k}": k / max(1, n - 1), "per_row_rr": rr}


def probe_table(embeddings: dict[str, np.ndarray], dataset: Dataset, k: int = 10) -> dict[str, dict[str, Any]]:
    """:func:`transition_probe` of each named embedding on the validation and test transitions (no per-row arrays)."""
    out: dict[str, dict[str, Any]] = {}
    splits = {"valid": held_out_transitions(dataset.valid), "test": held_out_transitions(dataset.test)}
    for name, emb in embeddings.items():
        out[name] = {}
        for split, (src, dst) in splits.items():
            r = transition_probe(emb, src, dst, k)
            r.pop("per_row_rr")
            out[name][split] = r
    return out
