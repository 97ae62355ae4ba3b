"""Keyword and category targets of TPAD's Knowledge-MLLM, and the keyword generation rate (GR).

Every item gets an answer string ``"Keywords: w1, w2, w3. Category: c"`` that the Knowledge-MLLM learns to generate
from its item prompt (answer-only LM loss). The keywords come from one of three sources (``KeywordConfig.source``):

* ``"metadata"`` (default): the words of the item's ``fields`` (e.g. category path, brand, colour) plus its
  ``title_terms`` most distinctive title words (lowest document frequency over all titles, ties by position);
* ``"file"``: a user file, JSON ``{"item_id": ["kw", ...]}`` or TSV lines ``item_id<TAB>kw1, kw2``;
* ``"metadata+image"``: metadata keywords plus the ImageNet top-``image_labels`` class names of the item's raw image
  (EfficientNet-Lite0 head), for datasets that ship images.

The category is the last element of ``category_field`` split on ``>``, ``|`` or ``,`` (e.g. "Lab Supplies" of a path
"Industrial & Scientific > Lab > Lab Supplies"), or absent. Words are normalised as everywhere else in the project
(:func:`distillrec.data.item_text.words`: lower case, plural ``s`` stripped, stop words dropped), and words present in
more than ``max_df`` of all items (e.g. the category root every item shares) are not keywords: generating them would
say nothing about the item.

GR (generation rate) of one item = the fraction of its keywords found (after the same normalisation) in a greedy
generation; the reported GR of a modality is the mean over the evaluated items when the prompt holds only that
modality (``image``: the soft image tokens, empty text; ``text``: the text, the learned "missing image" token) or
both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...data.dataset import DataError, Dataset
from ...data.item_text import item_fields, words


class KeywordConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["metadata", "file", "metadata+image"] = "metadata"
    fields: list[str] = Field(default_factory=lambda: ["category"])  # text fields whose words are keywords
    category_field: str | None = "category"  # the field holding the category (path); None: no category
    title_field: str = "title"
    title_terms: int = Field(2, ge=0)  # most distinctive title words added as keywords
    max_keywords: int = Field(6, ge=1)
    max_df: float = Field(0.5, gt=0, le=1)  # words in more than this share of items are not keywords
    strip_prefixes: list[str] = Field(default_factory=list)  # removed from the start of field values (category root)
    file: str | None = None  # source "file": JSON {item_id: [keywords]} or TSV item_id<TAB>kw1, kw2
    image_labels: int = Field(2, ge=0)  # source "metadata+image": ImageNet top-k labels per raw image


def ordered_words(text: str) -> list[str]:
    """The normalised words of ``text`` (as :func:`words`), in order of first appearance."""
    out: list[str] = []
    for w in re.findall(r"[a-z0-9]+", (text or "").lower()):
        for x in words(w):
            if x not in out:
                out.append(x)
    return out


def _category(value: str) -> str:
    parts = [p.strip() for p in re.split(r"\s*[>|,]\s*", value or "") if p.strip()]
    return parts[-1] if parts else ""


def _read_keyword_file(path: Path, ds: Dataset) -> dict[int, list[str]]:
    if not path.is_file():
        raise DataError(f"keywords.file: '{path}' does not exist; give a JSON or TSV file of item keywords")
    index = ds.items.index()
    out: dict[int, list[str]] = {}
    unknown = 0
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected an object {{item_id: [keyword, ...]}}")
        for k, v in raw.items():
            if not isinstance(v, list):
                raise DataError(f"{path}: item '{k}': expected a list of keywords, got {type(v).__name__}")
            if str(k) in index:
                out[index[str(k)]] = [str(x) for x in v]
            else:
                unknown += 1
    else:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            if "\t" not in line:
                raise DataError(f"{path}, line {n}: expected 'item_id<TAB>kw1, kw2'; got {line[:60]!r}")
            item, kws = line.split("\t", 1)
            if item.strip() in index:
                out[index[item.strip()]] = [k.strip() for k in kws.split(",") if k.strip()]
            else:
                unknown += 1
    if not out:
        raise DataError(f"{path}: no line names an item of dataset '{ds.name}' ({unknown} unknown ids)")
    return out


class KeywordTargets:
    """Per item (index 0 = padding): ``keywords`` (normalised words), ``category`` and the ``answer`` string."""

    def __init__(self, keywords: list[list[str]], category: list[str], notes: list[str]):
        self.keywords = keywords
        self.category = category
        self.notes = notes
        self.answers = [""] + [self._answer(k, c) for k, c in zip(keywords[1:], category[1:])]

    @staticmethod
    def _answer(kws: Sequence[str], cat: str) -> str:
        s = "Keywords: " + (", ".join(kws) if kws else "none")
        return s + (f". Category: {cat}" if cat else "")

    def target_words(self, item: int) -> set[str]:
        """What GR counts for an item: its keywords (category words included)."""
        return set(self.keywords[item]) | words(self.category[item])


def keyword_targets(ds: Dataset, cfg: KeywordConfig, image_paths: Sequence[str | None] | None = None
                    ) -> KeywordTargets:
    n = ds.n_items
    fields = [item_fields(ds, i, cfg.strip_prefixes) for i in range(1, n + 1)]
    have = sorted(fields[0]) if fields else []
    for f in cfg.fields + ([cfg.category_field] if cfg.category_field else []):
        if fields and f not in fields[0]:
            raise DataError(f"keywords: item text field '{f}' does not exist in dataset '{ds.name}' (it has {have}); "
                            "fix keywords.fields / keywords.category_field")
    notes: list[str] = []
    per_item: list[list[str]] = [[] for _ in range(n)]
    if cfg.source in ("metadata", "metadata+image"):
        field_words = [[w for f in cfg.fields for w in ordered_words(d.get(f, ""))] for d in fields]
        titles = [ordered_words(d.get(cfg.title_field, "")) if cfg.title_terms else [] for d in fields]
        df: dict[str, int] = {}
        for fw, tw in zip(field_words, titles):
            for w in set(fw) | set(tw):
                df[w] = df.get(w, 0) + 1
        common = {w for w, c in df.items() if c / max(1, n) > cfg.max_df}
        if common:
            notes.append(f"{len(common)} words in more than {cfg.max_df:.0%} of items are not keywords: "
                         + ", ".join(sorted(common)[:10]))
        for i in range(n):
            kws = [w for w in dict.fromkeys(field_words[i]) if w not in common]
            # the most distinctive title words: lowest document frequency first, then earliest in the title
            tw = sorted((w for w in titles[i] if w not in common and w not in kws),
                        key=lambda w: (df[w], titles[i].index(w)))
            per_item[i] = (kws + tw[: cfg.title_terms])[: cfg.max_keywords]
    if cfg.source == "metadata+image":
        if not image_paths or not any(image_paths):
            raise DataError(f"keywords.source 'metadata+image': dataset '{ds.name}' has no raw images; "
                            "use source 'metadata'")
        from ...features.image import ImageEncoder

        _, _, names = ImageEncoder().top_labels(list(image_paths), k=cfg.image_labels)
        added = 0
        for i, labels in enumerate(names):
            extra = [w for lab in labels for w in ordered_words(lab.split(",")[0])]
            new = [w for w in dict.fromkeys(extra) if w not in per_item[i]]
            per_item[i] = (per_item[i] + new)[: cfg.max_keywords + cfg.image_labels]
            added += bool(new)
        notes.append(f"image labels added to {added} items")
    if cfg.source == "file":
        if not cfg.file:
            raise DataError("keywords.source is 'file' but keywords.file is not set; give the file's path")
        got = _read_keyword_file(Path(cfg.file), ds)
        for i, kws in got.items():
            per_item[i - 1] = list(dict.fromkeys(w for k in kws for w in ordered_words(k)))[: cfg.max_keywords]
        if len(got) < n:
            notes.append(f"keyword file covers {len(got)} of {n} items; the others have no keywords")
    cats = [_category(d.get(cfg.category_field, "")) if cfg.category_field else "" for d in fields]
    empty = sum(1 for k, c in zip(per_item, cats) if not k and not c)
    if empty:
        notes.append(f"{empty} items have neither keywords nor a category (their answer is 'Keywords: none')")
    return KeywordTargets([[]] + per_item, [""] + cats, notes)


def generation_rate(generations: Sequence[str], targets: Sequence[set[str]]) -> float | None:
    """Mean fraction of each item's target words present in its generation (items without targets left out)."""
    rates = [len(words(g) & t) / len(t) for g, t in zip(generations, targets, strict=True) if t]
    return float(np.mean(rates)) if rates else None
