"""What every TPAD stage reads: item texts, image and text-view features, keyword answers, the held-out GR items and
the training sequences. Item ``i`` (1..n) everywhere; row 0 of the matrices is padding."""

from __future__ import annotations

import numpy as np
import torch

from ...data.dataset import Dataset
from ...data.item_text import item_texts
from ...features.cache import item_feature_matrix
from .config import TPADConfig
from .keywords import KeywordTargets, keyword_targets


class TPADData:
    def __init__(self, cfg: TPADConfig, ds: Dataset):
        self.ds = ds
        items = ds.items
        n = items.n_items
        self.texts = [""] + item_texts(items, cfg.text_fields if cfg.use_text else [])
        image = item_feature_matrix(cfg.image_features, items, cfg.progress) if cfg.use_image else None
        self.image = None if image is None else torch.from_numpy(image)
        self.has_image = np.zeros(n + 1, bool) if image is None else image.any(1)
        self.d_image = 1 if image is None else int(image.shape[1])
        self.text_view = None
        if cfg.text_view is not None and cfg.use_text:
            view = item_feature_matrix(cfg.text_view, items, cfg.progress, key="text_view",
                                       text_fields=cfg.text_fields)
            self.text_view = torch.from_numpy(view)
        self.has_text = np.array([bool(t.strip()) for t in self.texts])
        self.targets: KeywordTargets = keyword_targets(ds, cfg.keywords, items.image_paths)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x6E]))
        perm = rng.permutation(np.arange(1, n + 1))
        n_gr = min(cfg.knowledge.gr_items, max(0, n - 2))
        self.gr_items = sorted(int(i) for i in perm[:n_gr])
        self.train_items = np.array(sorted(int(i) for i in perm[n_gr:]), dtype=np.int64)
        self.sequences = ds.train
        self.seed = cfg.seed

    def stage_items(self, max_items: int | None, tag: int) -> np.ndarray:
        """A stage's training items: all (``max_items`` None) or ``max_items`` of them drawn at random by
        ``(seed, tag)`` -- never the lowest ids, which in sorted lists are the most frequent ones."""
        if max_items is None or max_items >= len(self.train_items):
            return self.train_items
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, tag]))
        return np.sort(rng.choice(self.train_items, max_items, replace=False))

    def heldout_pairs(self, n: int) -> tuple[np.ndarray, list[list[int]]]:
        """Up to ``n`` validation transitions (last history item -> target) with the anchor's session context (the
        items before it, at most ``context``), drawn by seed: the Transfer tower's held-out retrieval set."""
        hist, tgt = self.ds.valid.histories, self.ds.valid.targets
        rows = [i for i, h in enumerate(hist) if len(h) and int(h[-1]) != int(tgt[i])]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x7E]))
        rows = sorted(rng.choice(rows, min(n, len(rows)), replace=False).tolist()) if rows else []
        pairs = np.array([[int(hist[i][-1]), int(tgt[i]), 1] for i in rows], dtype=np.int64).reshape(-1, 3)
        contexts = [[int(x) for x in hist[i][:-1]] for i in rows]
        return pairs, contexts

    def images(self, items: np.ndarray, drop: np.ndarray | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        mask = torch.from_numpy(self.has_image[items].copy())
        if drop is not None:
            mask &= ~torch.from_numpy(drop)
        if self.image is None:
            return None, mask
        return self.image[torch.from_numpy(items)], mask

    def pair_texts(self, pairs: np.ndarray, contexts: list[list[int]] | None) -> list[str]:
        """The anchor prompts of meta pairs, naming the earlier items of the session when ``contexts`` is given."""
        if not contexts:
            return [self.texts[a] for a in pairs[:, 0]]
        titles = self.ds.items.text.get("title")
        name = (lambda i: titles[i - 1]) if titles else (lambda i: self.texts[i][:60])
        return [(f"Session so far: {'; '.join(name(c) for c in ctx)}. Now: " if ctx else "") + self.texts[a]
                for a, ctx in zip(pairs[:, 0], contexts)]
