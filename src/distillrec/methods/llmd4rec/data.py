"""What LLMD4Rec reads: the distillation rows (one per training user: its last training item is the target, the items
before it the history), the rows the LLM trains on, the ranked evaluation rows, the item texts and the prompts.
Items are internal ids 1..n; random choices by ``SeedSequence([seed, tag])``."""

from __future__ import annotations

import numpy as np

from ...data.dataset import Dataset, Examples
from ...data.item_text import item_texts
from ...errors import ConfigError
from .config import LLMD4RecConfig

DISTILL_USERS, EVAL_USERS = 0xD41, 0xD42  # seed streams


class D4Data:
    def __init__(self, cfg: LLMD4RecConfig, ds: Dataset):
        self.cfg, self.ds = cfg, ds
        texts = item_texts(ds.items, cfg.text_fields)
        self.texts = [""] + [" ".join(t.split())[: cfg.item_text_chars].strip() for t in texts]
        eligible = np.array([j for j, s in enumerate(ds.train) if len(s) >= 2], dtype=np.int64)
        if not len(eligible):
            raise ConfigError(f"dataset {ds.name!r}: no training sequence has 2 items; nothing to distil on")
        perm = np.random.default_rng(np.random.SeedSequence([cfg.seed, DISTILL_USERS])).permutation(len(eligible))
        n_distill = len(eligible) if cfg.distill_users is None else min(cfg.distill_users, len(eligible))
        n_llm = n_distill if cfg.llm_users is None else min(cfg.llm_users, n_distill)
        chosen = perm[:n_distill]
        self.rows = eligible[np.sort(chosen)]  # training sequences with teacher logits (sorted)
        pos_of = {int(j): k for k, j in enumerate(self.rows)}
        # the LLM's training rows: the first llm_users of the same permutation, as indices into self.rows
        self.llm_rows = np.sort(np.array([pos_of[int(eligible[c])] for c in perm[:n_llm]], dtype=np.int64))
        self.positions = np.array([len(ds.train[j]) - 1 for j in self.rows], dtype=np.int64)

    # ------------------------------------------------------------------------------------------------- the rows
    def distill_examples(self) -> Examples:
        """``history -> target`` of every distillation row (row k = training sequence ``rows[k]``)."""
        ds = self.ds
        hist = [ds.train[j][:-1] for j in self.rows]
        tgt = np.array([ds.train[j][-1] for j in self.rows], dtype=np.int64)
        users = [ds.train_users[j] for j in self.rows] if ds.train_users is not None else None
        return Examples(hist, tgt, users)

    def eval_rows(self, split: str = "test") -> np.ndarray:
        """The rows of ``split`` the LLM ranks: ``eval_users`` drawn by seed (the same rows in valid and test of a
        leave-one-out dataset), or all."""
        n = len(getattr(self.ds, split))
        m = self.cfg.eval_users
        if m is None or m >= n:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, EVAL_USERS]))
        return np.sort(rng.choice(n, m, replace=False)).astype(np.int64)

    # ---------------------------------------------------------------------------------------------- the prompts
    def item_prompt_texts(self) -> list[str]:
        """Each item's prompt text (index 0 = padding): the item as a one-item history, so that before training a
        user state whose history ends with item ``i`` is close to item ``i``'s embedding."""
        return [""] + [self.cfg.history_line.format(k=1, text=t) for t in self.texts[1:]]

    def user_text(self, history: np.ndarray, suggestions: np.ndarray | list[int]) -> str:
        """The CRM's suggestions (information augmentation, ``augment_top_k`` items, best first), then the history's
        last ``history_len`` items, oldest first: the prompt ends with the most recent item."""
        cfg = self.cfg
        items = [int(i) for i in history[-cfg.history_len:]]
        sugg = [int(i) for i in list(suggestions)[: cfg.augment_top_k]]
        lines = [cfg.suggestions.format(items="; ".join(self.texts[i] for i in sugg))] if sugg else []
        lines += [cfg.history_line.format(k=k + 1, text=self.texts[i]) for k, i in enumerate(items)]
        return "\n".join(lines)
