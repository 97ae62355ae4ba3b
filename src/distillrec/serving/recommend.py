"""Top-k recommendations for sessions given in the user's own item ids, from a finished run: the one scoring path of
``distillrec recommend`` (one session) and ``distillrec serve`` (micro-batches of sessions, :mod:`.service`).

A batch of sessions is scored by one call of the model's ``score`` (for the sequential models: one encoder pass and
one ``[B, d] x [d, n_items]`` product), masked, and cut with one ``topk``.

Cold items -- in the catalogue but never in a training sequence -- are handled by what the model has for them
(``Recommender.content_item_vectors``): a model with content vectors (the fused models, DIMO with features) reads
and recommends them through those vectors; an ID-only model has learnt nothing about them, so it neither recommends
them nor reads them in a session (they are reported as ignored), and a session with nothing else left is answered
with the most popular training items (``fallback="popular"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.batching import pad_histories
from ..data.dataset import Dataset
from ..errors import ConfigError, DataError
from ..models import Recommender
from ..runs import RunConfig, load_trained

TITLE_FIELDS = ("title", "name", "textual_id")  # the first text field of these that a dataset has is the title


class UnknownItems(DataError):
    """Item ids that are not in the catalogue; ``unknown`` holds (position in the session, id) pairs."""

    def __init__(self, unknown: list[tuple[int, str]], dataset: str):
        self.unknown = unknown
        self.dataset = dataset
        shown = [i for _, i in unknown[:5]]
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        super().__init__(f"unknown item id(s) {shown}{more}: they are not in the item table of '{dataset}'")


@dataclass(frozen=True)
class Query:
    """One session, checked and turned into internal ids (:meth:`TrainedRecommender.query`)."""

    session: tuple[str, ...]
    k: int
    history: np.ndarray  # internal ids the model reads, oldest first (cold ones left out for ID-only models)
    exclude: np.ndarray  # internal ids never recommended for it (the session's own items, with exclude_seen)
    cold: tuple[str, ...]  # session ids unseen in training
    ignored: tuple[str, ...]  # of those, the ones the model cannot read (it has no content vectors)
    truncated: int  # oldest readable items beyond the run's max_len, not read


@dataclass(frozen=True)
class Ranked:
    items: list[int]  # internal ids, best first
    scores: list[float]
    fallback: str | None = None  # "popular": nothing in the session was readable


@dataclass
class TrainedRecommender:
    model: Recommender
    dataset: Dataset
    config: RunConfig
    seed: int | None = None
    index: dict[str, int] = field(init=False, repr=False)
    train_counts: np.ndarray = field(init=False, repr=False)  # [n_items + 1]
    cold: np.ndarray = field(init=False, repr=False)  # bool [n_items + 1]: never in a training sequence

    def __post_init__(self) -> None:
        self.index = self.dataset.items.index()
        self.train_counts = self.dataset.item_train_counts()
        self.cold = self.train_counts == 0
        self.cold[0] = False
        blocked = np.flatnonzero(self.cold) if not self.content_vectors else np.zeros(0, np.int64)
        self._blocked = torch.from_numpy(blocked)
        by_count = np.argsort(-self.train_counts[1:], kind="stable") + 1
        self._popular = by_count[self.train_counts[by_count] > 0]

    @classmethod
    def from_run(cls, run_dir: str | Path, seed: int | None = None) -> "TrainedRecommender":
        """The best-validation model of ``run_dir`` (for ``seed``, default the config's first seed)."""
        t = load_trained(run_dir, seed)
        return cls(t.model, t.dataset, t.config, t.seed)

    @property
    def content_vectors(self) -> bool:
        """Whether items unseen in training are served through the model's content vectors (cold start)."""
        return bool(getattr(self.model, "content_item_vectors", False))

    @property
    def max_len(self) -> int:
        return self.config.train.max_len

    # ------------------------------------------------------------------------------------------------ the catalogue
    def item_titles(self) -> list[str]:
        """One title per item (index i = internal id i + 1): the first of ``TITLE_FIELDS`` the dataset has, else its
        first text field, else the id."""
        text = self.dataset.items.text
        name = next((f for f in TITLE_FIELDS if f in text), next(iter(text), None))
        return list(text[name]) if name else list(self.dataset.items.ids)

    # ------------------------------------------------------------------------------------------------ scoring
    def query(self, session: Sequence[str], k: int = 10, exclude_seen: bool = False) -> Query:
        """Check a session of external ids (every unknown id is named) and turn it into a :class:`Query`."""
        if k < 1:
            raise ConfigError(f"-k {k}: ask for at least one item")
        if not session:
            raise DataError("the session is empty: give at least one item id")
        index = self.index
        unknown = [(p, i) for p, i in enumerate(session) if i not in index]
        if unknown:
            raise UnknownItems(unknown, self.dataset.name)
        ids = np.fromiter((index[i] for i in session), dtype=np.int64, count=len(session))
        cold_mask = self.cold[ids]
        cold = tuple(dict.fromkeys(s for s, c in zip(session, cold_mask) if c))
        readable = ids if self.content_vectors else ids[~cold_mask]
        ignored = () if self.content_vectors else cold
        truncated = max(0, len(readable) - self.max_len)
        return Query(tuple(session), int(k), readable[truncated:], np.unique(ids) if exclude_seen else ids[:0],
                     cold, ignored, truncated)

    @torch.inference_mode()
    def top_k(self, queries: Sequence[Query]) -> list[Ranked]:
        """The top items of every query: the readable sessions scored together in one batch."""
        out: list[Ranked | None] = [None] * len(queries)
        rows = [j for j, q in enumerate(queries) if len(q.history)]
        if rows:
            history, lengths = pad_histories([queries[j].history for j in rows], self.max_len)
            scores = self.model.score({"history": history, "lengths": lengths}).float()
            scores[:, 0] = -torch.inf
            if len(self._blocked):
                scores[:, self._blocked] = -torch.inf
            for r, j in enumerate(rows):
                if len(queries[j].exclude):
                    scores[r, torch.from_numpy(queries[j].exclude)] = -torch.inf
            top = torch.topk(scores, min(max(queries[j].k for j in rows), self.dataset.n_items))
            values, indices = top.values.tolist(), top.indices.tolist()
            for r, j in enumerate(rows):
                k = queries[j].k
                keep = [(i, v) for i, v in zip(indices[r][:k], values[r][:k]) if v != -np.inf]
                out[j] = Ranked([i for i, _ in keep], [v for _, v in keep])
        for j, q in enumerate(queries):
            if out[j] is None:  # nothing readable: the most popular training items
                excluded = set(q.exclude.tolist())
                items = [int(i) for i in self._popular[: q.k + len(excluded)] if int(i) not in excluded][: q.k]
                out[j] = Ranked(items, [float(self.train_counts[i]) for i in items], fallback="popular")
        return out  # type: ignore[return-value]

    def recommend(self, session: list[str], k: int = 10, exclude_seen: bool = False) -> list[tuple[str, float]]:
        """``k`` (external item id, score) pairs for a session of external item ids, best first."""
        ranked = self.top_k([self.query(session, k, exclude_seen)])[0]
        return [(self.dataset.items.ids[i - 1], s) for i, s in zip(ranked.items, ranked.scores)]
