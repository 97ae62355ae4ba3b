"""Connector alignment's data: the held-out split, image features, answer targets and category words, and the
keyword-recall metric with its chance level (see :mod:`distillrec.methods.connector_alignment`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...data.dataset import Dataset
from ...data.item_text import item_fields, keyword_sets, words
from ...errors import ConfigError
from .config import AlignmentConfig


def keyword_scores(generations: Sequence[str], keywords: Sequence[set[str]], *, n_perm: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Keyword recall of ``generations`` against their own ``keywords``, the chance level (scored against every other
    item's keywords) and a one-sided permutation p-value; items without keywords are left out."""
    idx = [i for i, k in enumerate(keywords) if k]
    gw = [words(generations[i]) for i in idx]
    kw = [keywords[i] for i in idx]
    n = len(idx)
    if n == 0:
        return {"n": 0, "recall": None, "chance": None, "p_value": None, "hits": []}
    hit = np.array([[bool(gw[i] & kw[j]) for j in range(n)] for i in range(n)], dtype=bool)
    recall = float(hit.diagonal().mean())
    if n > 1:
        off = hit.sum(1) - hit.diagonal()
        chance = float((off / (n - 1)).mean())
        rng = np.random.default_rng(seed)
        ge = 0
        for _ in range(n_perm):
            p = rng.permutation(n)
            sigma = np.empty(n, dtype=np.int64)
            sigma[p] = np.roll(p, -1)  # a random cyclic derangement
            if hit[np.arange(n), sigma].mean() >= recall - 1e-12:
                ge += 1
        p_value = (1 + ge) / (1 + n_perm)
    else:
        chance, p_value = None, None
    return {"n": n, "recall": recall, "chance": chance, "p_value": p_value,
            "hits": [int(h) for h in hit.diagonal()], "items_evaluated": idx}


class AlignData:
    """Selected items, their image features, targets and category words."""

    def __init__(self, cfg: AlignmentConfig, ds: Dataset, tokenizer: Any | None = None):
        self.cfg = cfg
        n = ds.n_items
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xA11]))
        perm = rng.permutation(np.arange(1, n + 1))
        n_held = max(2, round(cfg.heldout_frac * n))
        if cfg.max_heldout is not None:
            n_held = min(n_held, cfg.max_heldout)
        if n_held >= n:
            raise ConfigError(f"dataset: {n} items are too few to hold out {n_held}; lower heldout_frac / max_heldout")
        held = perm[:n_held]
        rest = perm[n_held:]
        train = rest if cfg.max_items is None else rest[: cfg.max_items]
        self.notes: list[str] = []

        feats, missing = self._features(ds, np.concatenate([train, held]))
        feat_of = {int(i): k for k, i in enumerate(np.concatenate([train, held]))}
        if cfg.missing_images == "skip":
            keep_t = [i for i in train if not missing[feat_of[int(i)]]]
            keep_h = [i for i in held if not missing[feat_of[int(i)]]]
            dropped = len(train) + len(held) - len(keep_t) - len(keep_h)
            if dropped:
                self.notes.append(f"{dropped} selected items without image features skipped")
            train, held = np.asarray(keep_t, dtype=np.int64), np.asarray(keep_h, dtype=np.int64)
        self.train_items = [int(i) for i in train]
        self.heldout_items = [int(i) for i in held]
        self.features = {int(i): torch.from_numpy(np.ascontiguousarray(feats[feat_of[int(i)]])) for i in
                         self.train_items + self.heldout_items}
        self.missing = {int(i): bool(missing[feat_of[int(i)]]) for i in self.train_items + self.heldout_items}
        self.d_image = int(feats.shape[1])

        all_fields = [item_fields(ds, i, cfg.strip_prefixes) for i in range(1, n + 1)]
        for k in cfg.keyword_fields:
            if k not in all_fields[0]:
                raise ConfigError(f"keyword_fields: {k!r} is not an item text field; have {sorted(all_fields[0])}")
        try:
            self.targets_raw = {i: cfg.target_template.format(**all_fields[i - 1]).strip()
                                for i in self.train_items + self.heldout_items}
        except KeyError as e:
            raise ConfigError(f"target_template names the unknown field {e}; have {sorted(all_fields[0])}") from None
        kw_all, self.common_words = keyword_sets(all_fields, cfg.keyword_fields, cfg.max_keyword_df)
        self.keywords = {i: kw_all[i - 1] for i in self.heldout_items}
        self.tokenizer = tokenizer
        self.targets: dict[int, str] = {}

    def set_tokenizer(self, tok: Any) -> None:
        """Cut the targets to ``max_answer_tokens`` tokens of this tokenizer."""
        m = self.cfg.max_answer_tokens
        for i, t in self.targets_raw.items():
            ids = tok(t, add_special_tokens=False)["input_ids"]
            self.targets[i] = t if len(ids) <= m else tok.decode(ids[:m], skip_special_tokens=True).strip()

    def _features(self, ds: Dataset, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        if cfg.image_feature == "effnet":
            if not ds.items.image_paths:
                raise ConfigError(f"image_feature: dataset {ds.name!r} has no image paths, and 'effnet' needs images; "
                                  f"use one of its features {sorted(ds.items.features)}")
            from ...features import ImageEncoder, encode_images

            enc = ImageEncoder(cfg.image_encoder, top_k=0, batch_size=16)
            paths = [ds.items.image_paths[i - 1] for i in items]
            r = encode_images(enc, paths)
            self.notes.append(f"image features: {enc.feature_name} ({r.summary()})")
            return r.features.astype(np.float32), r.missing.astype(bool)
        if cfg.image_feature not in ds.items.features:
            raise ConfigError(f"image_feature: dataset {ds.name!r} has no feature {cfg.image_feature!r}; have "
                              f"{sorted(ds.items.features)} (or 'effnet' to encode its images)")
        m = ds.items.features[cfg.image_feature][items].astype(np.float32)
        return m, ~m.any(1)

    def batch(self, items: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self.features[i] for i in items]).to(device)
        mask = torch.tensor([not self.missing[i] for i in items])
        return x, mask
