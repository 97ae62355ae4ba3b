"""Raw Amazon Reviews files: 2018 (``<Cat>_5.json.gz`` + ``meta_<Cat>.json.gz``) and 2023
(``<Cat>.jsonl.gz`` + ``meta_<Cat>.jsonl.gz``), one JSON object per line (plain ``.json``/``.jsonl`` also read).

Modes:
- ``mode="sequential"``: k-core filtering (users and items with at least ``k`` interactions, default 5, repeated
  until stable), each user's reviews in time order, per-user leave-one-out.
- ``mode="session"`` (DIMO preprocessing, papers.md §4.4): one session per user = the reviews within 24 h of the
  user's first review (strictly less than 86,400 s later, so with day-granular 2018 timestamps: the first day);
  sessions of length 1 dropped; items seen fewer than ``min_item_count`` (5) times removed (sessions left shorter
  than 2 dropped); sessions cut to their first ``max_session_length`` (20) items; sessions ordered by user id, the
  first ``train_fraction`` (90%) train, the rest test; the last ``valid_fraction`` (10%) of the train sessions
  become valid; valid/test items unseen in training dropped and valid/test sessions shorter than 2 dropped; one
  valid/test example per session (prefix -> last item).

Item text fields: ``title``, ``brand`` (2023: ``store``), ``category`` (category path joined with " > "),
``description``. ``items.image_paths`` holds the first high-resolution image URL (not downloaded; None when absent).
Malformed JSON lines are skipped and counted (the first few noted with file and line); a file whose lines all fail
raises a DataError.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import DataError, Dataset, Examples, ItemTable, LoadReport, leave_one_out
from . import register_loader
from ._io import as_folder, iter_lines

_MAX_NOTES = 3


def iter_json_lines(path: Path, report: LoadReport):
    """Yield (line number, dict) for each parsable JSON object line; malformed lines are counted and skipped."""
    n_lines = n_bad = 0
    first_error = ""
    for lineno, line in iter_lines(path, report=report, errors="replace", expect="one JSON object per line"):
        n_lines += 1
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            n_bad += 1
            if n_bad == 1:
                first_error = str(e)[:80]
            if n_bad <= _MAX_NOTES:
                report.notes.append(f"{path.name} line {lineno}: malformed JSON skipped ({str(e)[:60]})")
            continue
        yield lineno, obj
    if n_bad:
        report.skip(f"malformed JSON lines in {path.name}", n_bad)
    if n_bad == n_lines:
        raise DataError(f"{path}, line 1: no line is valid JSON ({first_error}); the file must hold one JSON "
                        "object per line (JSON Lines), e.g. the original Amazon Reviews download")


def _pick(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def _detect_category(folder: Path, pattern: str, suffix: str) -> str:
    found = sorted(p.name for p in folder.glob(pattern) if not p.name.startswith("meta_"))
    if len(found) != 1:
        what = "none" if not found else ", ".join(found[:5])
        raise DataError(f"{folder}: found {what} matching {pattern}; give the option 'category' (the file stem, "
                        f"e.g. 'Cell_Phones_and_Accessories')")
    return found[0][: -len(suffix)]


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return " ".join(_text(x) for x in v if _text(x)).strip()
    return " ".join(str(v).split())


def _reviews(path: Path, report: LoadReport, user_key: str, item_keys: tuple[str, ...], time_key: str,
             time_scale: float) -> list[tuple[str, str, float, int]]:
    out = []
    missing = 0
    for lineno, obj in iter_json_lines(path, report):
        user = obj.get(user_key)
        item = next((obj[k] for k in item_keys if obj.get(k)), None)
        t = obj.get(time_key)
        if not user or not item or t is None:
            missing += 1
            if missing <= _MAX_NOTES:
                report.notes.append(f"{path.name} line {lineno}: lacks {user_key}/{item_keys[0]}/{time_key}, skipped")
            continue
        try:
            t = float(t) / time_scale
        except (TypeError, ValueError):
            missing += 1
            continue
        out.append((str(user), str(item), t, lineno))
    report.skip(f"review lines in {path.name} without user, item or time", missing)
    if not out:
        raise DataError(f"{path}: no usable review (needs {user_key}, {item_keys[0]} and {time_key} on each line)")
    return out


def _meta(path: Path | None, report: LoadReport, wanted: set[str], year: int) -> dict[str, dict[str, Any]]:
    if path is None:
        report.notes.append("no meta file: items have ids only")
        return {}
    key = "asin" if year == 2018 else "parent_asin"
    out: dict[str, dict[str, Any]] = {}
    for _, obj in iter_json_lines(path, report):
        item = obj.get(key) or obj.get("asin")
        if not item or item not in wanted or item in out:
            continue
        if year == 2018:
            cats = obj.get("category") or []
            imgs = obj.get("imageURLHighRes") or obj.get("imageURL") or []
            image = imgs[0] if isinstance(imgs, list) and imgs else (imgs if isinstance(imgs, str) and imgs else None)
            brand = obj.get("brand")
        else:
            cats = obj.get("categories") or []
            image = None
            for im in obj.get("images") or []:
                if isinstance(im, dict) and (im.get("hi_res") or im.get("large")):
                    image = im.get("hi_res") or im.get("large")
                    break
            brand = obj.get("store")
        out[item] = {
            "title": _text(obj.get("title")),
            "brand": _text(brand),
            "category": " > ".join(_text(c) for c in cats if _text(c)) if isinstance(cats, list) else _text(cats),
            "description": _text(obj.get("description")),
            "image": image,
        }
    return out


def _user_sequences(reviews: list[tuple[str, str, float, int]]) -> dict[str, list[tuple[float, int, str]]]:
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for u, i, t, ln in reviews:
        by_user.setdefault(u, []).append((t, ln, i))
    for evs in by_user.values():
        evs.sort()
    return dict(sorted(by_user.items()))


def k_core(seqs: dict[str, list[tuple[float, int, str]]], k: int) -> dict[str, list[tuple[float, int, str]]]:
    """Keep users and items with at least k interactions each, repeated until nothing changes."""
    while True:
        counts = Counter(i for evs in seqs.values() for _, _, i in evs)
        new = {}
        for u, evs in seqs.items():
            kept = [e for e in evs if counts[e[2]] >= k]
            if len(kept) >= k:
                new[u] = kept
        if sum(map(len, new.values())) == sum(map(len, seqs.values())):
            return new
        seqs = new


def _items(ext_ids: list[str], meta: dict[str, dict[str, Any]], report: LoadReport) -> ItemTable:
    items = ItemTable(ids=ext_ids)
    for f in ("title", "brand", "category", "description"):
        items.text[f] = [meta.get(e, {}).get(f, "") for e in ext_ids]
    items.image_paths = [meta.get(e, {}).get("image") for e in ext_ids]
    no_meta = sum(e not in meta for e in ext_ids)
    if meta and no_meta:
        report.notes.append(f"{no_meta} items have no meta row (empty text)")
    return items


def _load(path, year: int, category: str | None, mode: str, k: int, min_item_count: int, max_session_length: int,
          train_fraction: float, valid_fraction: float, session_seconds: float) -> Dataset:
    fmt = f"amazon{year}"
    folder = as_folder(path, fmt)
    if path is not None and Path(path).is_file() and category is None:
        name = Path(path).name
        category = name.split("_5.json")[0] if year == 2018 else name.split(".jsonl")[0]
    if mode not in ("sequential", "session"):
        raise DataError(f"option mode={mode!r}: give 'sequential' (k-core, leave-one-out) or 'session' (DIMO)")
    if year == 2018:
        category = category or _detect_category(folder, "*_5.json*", "_5.json.gz")
        rev_path = _pick(folder, [f"{category}_5.json.gz", f"{category}_5.json"])
        meta_path = _pick(folder, [f"meta_{category}.json.gz", f"meta_{category}.json"])
        rev_name = f"{category}_5.json.gz"
    else:
        category = category or _detect_category(folder, "*.jsonl*", ".jsonl.gz")
        rev_path = _pick(folder, [f"{category}.jsonl.gz", f"{category}.jsonl"])
        meta_path = _pick(folder, [f"meta_{category}.jsonl.gz", f"meta_{category}.jsonl"])
        rev_name = f"{category}.jsonl.gz"
    if rev_path is None:
        raise DataError(f"{folder / rev_name}: review file not found; put it there or fix the option 'category'")
    report = LoadReport()
    if year == 2018:
        reviews = _reviews(rev_path, report, "reviewerID", ("asin",), "unixReviewTime", 1.0)
    else:
        reviews = _reviews(rev_path, report, "user_id", ("parent_asin", "asin"), "timestamp", 1000.0)
    seqs = _user_sequences(reviews)
    protocol: dict[str, Any] = {"source_format": fmt, "category": category, "mode": mode,
                                "image_paths": "first high-resolution image URL (not downloaded)"}

    if mode == "sequential":
        n_before = len(reviews)
        seqs = k_core(seqs, k)
        report.skip(f"reviews removed by {k}-core filtering", n_before - sum(len(v) for v in seqs.values()))
        if not seqs:
            raise DataError(f"{rev_path}: no user is left after {k}-core filtering; lower the option k")
        ext_ids = sorted({i for evs in seqs.values() for _, _, i in evs})
        meta = _meta(meta_path, report, set(ext_ids), year)
        items = _items(ext_ids, meta, report)
        index = items.index()
        users = list(seqs)
        sequences = [np.asarray([index[i] for _, _, i in seqs[u]], dtype=np.int64) for u in users]
        times = [np.asarray([t for t, _, _ in seqs[u]]) for u in users]
        protocol.update({"k_core": k})
        return leave_one_out(category, items, sequences, users, timestamps=times, protocol=protocol, report=report)

    # session mode (DIMO)
    sessions: list[tuple[str, list[str]]] = []
    late = 0
    for u, evs in seqs.items():
        t0 = evs[0][0]
        first = [i for t, _, i in evs if t - t0 < session_seconds]
        late += len(evs) - len(first)
        sessions.append((u, first))
    report.skip("reviews later than 24 h after the user's first review", late)
    n_one = sum(len(s) < 2 for _, s in sessions)
    sessions = [(u, s) for u, s in sessions if len(s) >= 2]
    report.skip("sessions of length 1", n_one)
    counts = Counter(i for _, s in sessions for i in s)
    rare = 0
    kept_sessions = []
    for u, s in sessions:
        kept = [i for i in s if counts[i] >= min_item_count]
        rare += len(s) - len(kept)
        if len(kept) >= 2:
            kept_sessions.append((u, kept))
    report.skip(f"clicks on items seen fewer than {min_item_count} times", rare)
    report.skip("sessions shorter than 2 after removing rare items", len(sessions) - len(kept_sessions))
    cut = sum(max(0, len(s) - max_session_length) for _, s in kept_sessions)
    sessions = [(u, s[:max_session_length]) for u, s in kept_sessions]
    report.skip(f"items beyond the first {max_session_length} of a session", cut)
    if not sessions:
        raise DataError(f"{rev_path}: no session is left after filtering; lower the option min_item_count")
    n_train = int(len(sessions) * train_fraction)
    train_s, test_s = sessions[:n_train], sessions[n_train:]
    n_valid = int(round(len(train_s) * valid_fraction))
    train_s, valid_s = train_s[: len(train_s) - n_valid], train_s[len(train_s) - n_valid:]
    ext_ids = sorted({i for _, s in train_s for i in s})
    if not ext_ids:
        raise DataError(f"{rev_path}: no training session is left; give more data or a larger train_fraction")
    meta = _meta(meta_path, report, set(ext_ids), year)
    items = _items(ext_ids, meta, report)
    index = items.index()

    def one_per_session(part: list[tuple[str, list[str]]], label: str) -> Examples:
        hist, tgt, us = [], [], []
        unseen = short = 0
        for u, s in part:
            kept = [index[i] for i in s if i in index]
            unseen += len(s) - len(kept)
            if len(kept) < 2:
                short += 1
                continue
            hist.append(np.asarray(kept[:-1], dtype=np.int64))
            tgt.append(kept[-1])
            us.append(u)
        report.skip(f"{label} items unseen in training", unseen)
        report.skip(f"{label} sessions shorter than 2 after removing unseen items", short)
        return Examples(hist, np.asarray(tgt, dtype=np.int64), us)

    valid = one_per_session(valid_s, "valid")
    test = one_per_session(test_s, "test")
    protocol.update({
        "split": "DIMO session split: first day per user, ordered by user id, 90/10",
        "session_window_s": session_seconds, "min_item_count": min_item_count,
        "max_session_length": max_session_length, "train_fraction": train_fraction,
        "valid_fraction": valid_fraction, "eval_examples": "one per session (prefix -> last item)",
    })
    return Dataset(
        name=category, items=items, train=[np.asarray([index[i] for i in s], dtype=np.int64) for _, s in train_s],
        valid=valid, test=test, train_users=[u for u, _ in train_s], protocol=protocol, report=report,
    )


@register_loader("amazon2018")
def load_amazon2018(path: Path | str | None = None, *, category: str | None = None, mode: str = "sequential",
                    k: int = 5, min_item_count: int = 5, max_session_length: int = 20, train_fraction: float = 0.9,
                    valid_fraction: float = 0.1, session_seconds: float = 86400.0) -> Dataset:
    return _load(path, 2018, category, mode, k, min_item_count, max_session_length, train_fraction,
                 valid_fraction, session_seconds)


@register_loader("amazon2023")
def load_amazon2023(path: Path | str | None = None, *, category: str | None = None, mode: str = "sequential",
                    k: int = 5, min_item_count: int = 5, max_session_length: int = 20, train_fraction: float = 0.9,
                    valid_fraction: float = 0.1, session_seconds: float = 86400.0) -> Dataset:
    return _load(path, 2023, category, mode, k, min_item_count, max_session_length, train_fraction,
                 valid_fraction, session_seconds)
