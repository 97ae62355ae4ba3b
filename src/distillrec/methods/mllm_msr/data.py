"""What MLLM-MSR reads: the users it trains on and ranks, their histories, the SFT pairs (1 positive : k negatives) and
the item text and image features of the prompts. Items are internal ids 1..n."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...data.dataset import Dataset
from ...data.item_text import item_texts
from ...errors import ConfigError
from ...features.cache import item_feature_matrix
from ...llm.multimodal import IMAGE_TOKEN
from .config import IMAGE_LINE, ITEM_LINE, MLLMMSRConfig

TRAIN_USERS, TRAIN_NEGATIVES, EVAL_USERS = 0x5F7, 0x5F8, 0x5F9  # seed streams


@dataclass
class TrainPairs:
    """SFT rows: ``user`` (index into ``histories``), ``item``, ``label`` (1 yes / 0 no)."""

    histories: list[list[int]]  # per training user: the last history_len items before its target
    users: list[str]
    user: np.ndarray
    item: np.ndarray
    label: np.ndarray


def interacted_items(ds: Dataset) -> dict[str, set[int]]:
    """Every item each user id ever interacted with (training sequence, validation and test targets)."""
    seen: dict[str, set[int]] = {}
    users = ds.train_users or []
    for u, seq in zip(users, ds.train):
        seen.setdefault(u, set()).update(int(i) for i in seq)
    for ex in (ds.valid, ds.test):
        if ex.users is None:
            continue
        for u, h, t in zip(ex.users, ex.histories, ex.targets):
            seen.setdefault(u, set()).update(int(i) for i in h)
            seen[u].add(int(t))
    return seen


def sample_unseen(rng: np.random.Generator, n_items: int, seen: set[int], k: int) -> list[int]:
    """``k`` distinct items of 1..n_items outside ``seen``, uniformly."""
    if n_items - len(seen) < k:
        raise ConfigError(f"a user has interacted with {len(seen)} of {n_items} items, too many to draw {k} negatives")
    out: list[int] = []
    while len(out) < k:
        for i in rng.integers(1, n_items + 1, size=2 * k):
            i = int(i)
            if i not in seen and i not in out:
                out.append(i)
                if len(out) == k:
                    break
    return out


class MSRData:
    def __init__(self, cfg: MLLMMSRConfig, ds: Dataset):
        if ds.train_users is None or ds.test.users is None:
            raise ConfigError(f"dataset {ds.name!r}: MLLM-MSR needs user ids (a user-sequence dataset with a "
                              "leave-one-out split); session datasets without users are not supported")
        self.cfg, self.ds = cfg, ds
        items = ds.items
        fields = cfg.text_fields
        if fields is None and "title" in items.text:
            fields = ["title"]
        texts = item_texts(items, fields)
        self.titles = [""] + [t[: cfg.item_text_chars].strip() for t in texts]
        image = item_feature_matrix(cfg.image_features, items, cfg.progress) if cfg.uses_images else None
        self.image = None if image is None else torch.from_numpy(image)
        self.has_image = np.zeros(items.n_items + 1, bool) if image is None else image.any(1)
        self.d_image = 1 if image is None else int(image.shape[1])
        self.seen = interacted_items(ds)
        self.image_summaries: dict[int, str] = {}

    # ------------------------------------------------------------------------------------------------ the users
    def history(self, seq: np.ndarray) -> list[int]:
        return [int(i) for i in seq[-self.cfg.history_len:]] if len(seq) else []

    def train_pairs(self) -> TrainPairs:
        """``train_users`` users (drawn by seed among those with at least 2 training items); target = the last
        training item, history = the items before it; ``train_negatives`` never-interacted items per positive."""
        cfg, ds = self.cfg, self.ds
        ok = [j for j, s in enumerate(ds.train) if len(s) >= 2]
        if not ok:
            raise ConfigError(f"dataset {ds.name!r}: no training sequence has 2 items; MLLM-MSR has nothing to train on")
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, TRAIN_USERS]))
        chosen = ok if cfg.train_users is None or cfg.train_users >= len(ok) else \
            sorted(rng.choice(ok, cfg.train_users, replace=False).tolist())
        neg_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, TRAIN_NEGATIVES]))
        hist, users, u, it, lab = [], [], [], [], []
        for r, j in enumerate(chosen):
            seq = ds.train[j]
            hist.append(self.history(seq[:-1]))
            users.append(ds.train_users[j])
            u.append(r)
            it.append(int(seq[-1]))
            lab.append(1)
            for neg in sample_unseen(neg_rng, ds.n_items, self.seen[ds.train_users[j]], cfg.train_negatives):
                u.append(r)
                it.append(neg)
                lab.append(0)
        return TrainPairs(hist, users, np.array(u), np.array(it), np.array(lab))

    def eval_rows(self) -> np.ndarray:
        """The rows of the valid/test examples that are ranked (``eval_users`` of them by seed; the same users in
        both splits of a leave-one-out dataset)."""
        n = len(self.ds.test)
        m = self.cfg.eval_users
        if m is None or m >= n:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, EVAL_USERS]))
        return np.sort(rng.choice(n, m, replace=False)).astype(np.int64)

    # ----------------------------------------------------------------------------------------------- the prompts
    def item_line(self, k: int, item: int) -> str:
        line = ITEM_LINE.format(k=k, title=self.titles[item])
        summary = self.image_summaries.get(item)
        if self.cfg.summarises_images and summary:
            line += IMAGE_LINE.format(summary=summary)
        return line + "."

    def recommend_prompt(self, preference: str, item: int) -> str:
        image = f", picture: {IMAGE_TOKEN}" if self.cfg.uses_images else ""
        return self.cfg.recommend_prompt.format(preference=preference, title=self.titles[item], image=image)

    def images(self, items: list[int] | np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.image is None:
            return None, None
        idx = torch.as_tensor(np.asarray(items, dtype=np.int64))
        return self.image[idx], torch.from_numpy(self.has_image[np.asarray(items, dtype=np.int64)].copy())
