"""Words of item text: the RecBole/UniSRec ``"title. categories. brand."`` split, normalised word sets, and the
category words of an item (used as keyword targets and to score generated keywords)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import ConfigError
from .dataset import Dataset, ItemTable

STOP_WORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to with without your you "
    "our we not no new set pack pcs piece pieces other others more most all any each per into over under via "
    "de et product item".split()
)


def split_item_text(text: str) -> dict[str, str]:
    """``"title. categories. brand."`` (RecBole/UniSRec item text) -> ``{"title", "categories", "brand"}``.
    The last ``". "`` piece is the brand, the one before it the category path, the rest the title."""
    s = (text or "").strip()
    if s.endswith("."):
        s = s[:-1]
    parts = s.split(". ")
    if len(parts) >= 3:
        return {"title": ". ".join(parts[:-2]).strip(), "categories": parts[-2].strip(), "brand": parts[-1].strip()}
    if len(parts) == 2:
        return {"title": parts[0].strip(), "categories": parts[1].strip(), "brand": ""}
    return {"title": s, "categories": "", "brand": ""}


def normalise_word(w: str) -> str:
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def words(text: str) -> set[str]:
    """Lower-cased ``[a-z0-9]+`` words, plural ``s`` stripped, stop words and pure numbers removed."""
    out = set()
    for w in re.findall(r"[a-z0-9]+", (text or "").lower()):
        if w in STOP_WORDS or w.isdigit() or len(w) < 2:
            continue
        out.add(normalise_word(w))
    return out - STOP_WORDS


def item_fields(ds: Dataset, item: int, strip_prefixes: Sequence[str] = ()) -> dict[str, str]:
    """All text fields of internal item ``item`` (+ ``title``/``categories``/``brand`` parsed from ``text``), each
    value without the first of ``strip_prefixes`` it starts with (e.g. the category root every item shares)."""
    f = {name: (vals[item - 1] or "") for name, vals in ds.items.text.items()}
    if "text" in f:
        for k, v in split_item_text(f["text"]).items():
            f.setdefault(k, v)
    for k, v in f.items():
        for p in strip_prefixes:
            if p and v.startswith(p):
                f[k] = v[len(p):].lstrip(" .,;:>|/-")
                break
    return f


def keyword_sets(field_dicts: Sequence[dict[str, str]], keyword_fields: Sequence[str],
                 max_df: float) -> tuple[list[set[str]], list[str]]:
    """Category words per item (see the module docstring) and the words dropped for a document frequency above
    ``max_df``."""
    raw = [set().union(*(words(f.get(k, "")) for k in keyword_fields)) if keyword_fields else set()
           for f in field_dicts]
    n = max(1, len(raw))
    df: dict[str, int] = {}
    for s in raw:
        for w in s:
            df[w] = df.get(w, 0) + 1
    common = sorted(w for w, c in df.items() if c / n > max_df)
    drop = set(common)
    return [s - drop for s in raw], common


def item_texts(items: ItemTable, text_fields: list[str] | None) -> list[str]:
    """The text of items 1..n: the named fields joined by ". " (None: every field; []: no text at all, the
    "without text" ablation); an unknown field is a ConfigError that names it."""
    if text_fields is not None:
        unknown = [f for f in text_fields if f not in items.text]
        if unknown:
            raise ConfigError(f"text_fields: unknown field(s) {unknown}; the dataset has {list(items.text)}")
    return [items.item_text(i, text_fields) if text_fields != [] else "" for i in range(1, items.n_items + 1)]
