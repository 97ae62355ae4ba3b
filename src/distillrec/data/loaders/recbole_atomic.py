"""RecBole / UniSRec atomic files (``<Name>.train.inter`` / ``.valid.inter`` / ``.test.inter`` + side files).

Folder layout (the UniSRec "downstream" layout, e.g. ``amazon2018-scientific-mm``)::

    <Name>.train.inter   user_id:token \t item_id_list:token_seq \t item_id:token   (every prefix of each history)
    <Name>.valid.inter   the same, one row per user (history -> second-last item)
    <Name>.test.inter    the same, one row per user (history -> last item)
    <Name>.item2index    external item id \t 0-based item index          (optional: else ids are the indices)
    <Name>.user2index    external user id \t 0-based user index          (optional)
    <Name>.text          item_id:token \t text:token_seq                  (optional: item text field "text")
    <Name>.feat1CLS      raw float32 [n_items, 512], row i = item index i (optional: feature "text_clip")
    <Name>.feat3CLS      raw float32 [n_items, 512]                       (optional: feature "image_clip")

Item index i of the files becomes internal id i + 1. The training sequence of a user is the longest
``history + [target]`` among its training rows; every other training row must be a prefix of it, and the valid
history must equal it (both checked; disagreements are counted in the report). The files cut long histories to
their last 50 items (UniSRec's max length); the loader rebuilds the full sequences from the overlapping rows and
restores cut valid/test histories, noting how many.

This module also holds the small file helpers the other loaders share.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import DataError, Dataset, Examples, ItemTable, LoadReport
from . import known_dataset, register_loader

# --------------------------------------------------------------------------------------------------------------------
# shared helpers


def as_folder(path: Path | str | None, fmt: str) -> Path:
    """The folder a loader reads: ``path`` itself, or the folder of a file inside it."""
    if path is None:
        raise DataError(f"format '{fmt}' needs a path: give dataset.path (the folder that holds the files)")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: does not exist; give the folder that holds the {fmt} files")
    return p if p.is_dir() else p.parent


def find_one(folder: Path, pattern: str, what: str, option: str, *, exclude: tuple[str, ...] = ()) -> Path:
    """The single file in ``folder`` matching ``pattern`` (a glob), or a DataError saying what to do."""
    found = sorted(p for p in folder.glob(pattern) if p.is_file() and not any(p.name.endswith(e) for e in exclude))
    if not found:
        raise DataError(f"{folder}: no {what} file ({pattern}) found; put it there or give the option '{option}'")
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:6])
        raise DataError(f"{folder}: several {what} files match {pattern} ({names}); choose one with the option '{option}'")
    return found[0]


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found; {fix}")
    return path


def read_lines(path: Path) -> list[str]:
    """All lines of a text file (gzip when the name ends in .gz), without line ends; DataError on unreadable files."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        line = 1 + (e.object[: e.start].count(b"\n") if isinstance(e.object, bytes) else 0)
        raise DataError(f"{path}, line {line}: not valid UTF-8 text ({e.reason}); re-save the file as UTF-8") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read ({e}); check that the file is complete (and gzip when named .gz)") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: the file is empty; give a file with data rows")
    return lines


def parse_int(tok: str, path: Path, lineno: int, field: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise DataError(
            f"{path}, line {lineno}: {field} '{tok[:40]}' is not an integer; ids in this file must be integers"
        ) from None


def parse_ints(text: str, path: Path, lineno: int, field: str) -> list[int]:
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        bad = next(t for t in text.split() if not t.lstrip("-").isdigit())
        raise DataError(
            f"{path}, line {lineno}: {field} contains '{bad[:40]}', which is not an integer id; "
            "give space-separated integer ids"
        ) from None


def header_columns(line: str, path: Path, sep: str, required: list[str], *, strip_types: bool = True) -> dict[str, int]:
    """Column name (``name:type`` reduced to ``name``) -> position; DataError naming missing columns."""
    names = [c.strip() for c in line.split(sep)]
    if strip_types:
        names = [c.split(":", 1)[0] for c in names]
    cols = {n: i for i, n in enumerate(names)}
    missing = [r for r in required if r not in cols]
    if missing:
        raise DataError(
            f"{path}, line 1: header {names} lacks column(s) {missing}; the first line must name the columns "
            f"{required} separated by {sep!r}"
        )
    return cols


def dense_ids(ids: list[str]) -> dict[str, int]:
    return {e: i + 1 for i, e in enumerate(ids)}


# --------------------------------------------------------------------------------------------------------------------
# the loader


def _read_index(path: Path, what: str) -> list[str]:
    """``<ext id> \\t <0-based index>`` -> list of external ids in index order."""
    pairs: dict[int, str] = {}
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}, line {lineno}: expected '<{what} id>\\t<index>', got {len(parts)} column(s)")
        if lineno == 1 and not parts[1].strip().lstrip("-").isdigit():
            continue  # a header row
        idx = parse_int(parts[1].strip(), path, lineno, "index")
        if idx in pairs:
            raise DataError(f"{path}, line {lineno}: index {idx} is given twice; each index must appear once")
        pairs[idx] = parts[0].strip()
    n = len(pairs)
    if n and (min(pairs) != 0 or max(pairs) != n - 1):
        raise DataError(
            f"{path}: indices run {min(pairs)}..{max(pairs)} for {n} rows; they must be dense 0..{n - 1}"
        )
    return [pairs[i] for i in range(n)]


def _read_inter(path: Path, n_items: int | None) -> tuple[list[str], list[list[int]], list[int]]:
    lines = read_lines(path)
    cols = header_columns(lines[0], path, "\t", ["user_id", "item_id_list", "item_id"])
    cu, cl, ci = cols["user_id"], cols["item_id_list"], cols["item_id"]
    width = max(cu, cl, ci) + 1
    users, hists, targets = [], [], []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < width:
            raise DataError(
                f"{path}, line {lineno}: {len(parts)} tab-separated column(s), the header names {width}; "
                "each row needs user_id, item_id_list and item_id"
            )
        hist = parse_ints(parts[cl], path, lineno, "item_id_list")
        tgt = parse_int(parts[ci].strip(), path, lineno, "item_id")
        if n_items is not None:
            bad = [i for i in (*hist, tgt) if i < 0 or i >= n_items]
            if bad:
                raise DataError(
                    f"{path}, line {lineno}: item index {bad[0]} is outside 0..{n_items - 1} of the item2index "
                    "file; use the indices of <Name>.item2index"
                )
        users.append(parts[cu].strip())
        hists.append(hist)
        targets.append(tgt)
    return users, hists, targets


def _detect_name(folder: Path, name: str | None) -> str:
    if name:
        return name
    p = find_one(folder, "*.train.inter", "RecBole training", "stem")
    return p.name[: -len(".train.inter")]


@register_loader("recbole_atomic")
def load_recbole_atomic(path: Path | str | None = None, *, stem: str | None = None, feature_dim: int = 512,
                        features: bool = True) -> Dataset:
    folder = as_folder(path, "recbole_atomic")
    name = _detect_name(folder, stem)
    base = folder / name
    report = LoadReport()
    fix = f"the folder must hold {name}.train.inter, {name}.valid.inter and {name}.test.inter"
    for part in ("train", "valid", "test"):
        require_file(folder / f"{name}.{part}.inter", f"{part} interaction", fix)

    item_ids: list[str] | None = None
    if (folder / f"{name}.item2index").is_file():
        item_ids = _read_index(folder / f"{name}.item2index", "item")
    user_names: list[str] | None = None
    if (folder / f"{name}.user2index").is_file():
        user_names = _read_index(folder / f"{name}.user2index", "user")

    n_known = len(item_ids) if item_ids is not None else None
    tr = _read_inter(folder / f"{name}.train.inter", n_known)
    va = _read_inter(folder / f"{name}.valid.inter", n_known)
    te = _read_inter(folder / f"{name}.test.inter", n_known)
    if item_ids is None:
        top = max(max((max(h, default=-1) for h in part[1]), default=-1) for part in (tr, va, te))
        top = max(top, *(max(part[2], default=-1) for part in (tr, va, te)))
        item_ids = [str(i) for i in range(top + 1)]
        report.notes.append(f"no {name}.item2index: item ids are the file indices")

    # training sequences. The files may cut histories to their last L items (UniSRec: L = 50), so a user's
    # sequence is rebuilt as: the longest row with an uncut history, then extended by every row whose (cut)
    # history equals the last L items built so far. Rows that fit nowhere are counted.
    hist_cap = max((len(h) for part in (tr, va, te) for h in part[1]), default=0)
    order: list[str] = []
    rows: dict[str, list[tuple[list[int], int]]] = {}
    for u, h, t in zip(*tr):
        if u not in rows:
            rows[u] = []
            order.append(u)
        rows[u].append((h, t))
    train_seq: dict[str, list[int]] = {}
    inconsistent = 0
    for u in order:
        urows = rows[u]
        short = [h + [t] for h, t in urows if len(h) < hist_cap]
        seq = max(short, key=len) if short else urows[0][0] + [urows[0][1]]
        capped: dict[tuple[int, ...], list[int]] = {}
        for h, t in urows:
            if len(h) == hist_cap:
                capped.setdefault(tuple(h), []).append(t)
        while True:
            nxt = capped.get(tuple(seq[-hist_cap:]))
            if not nxt:
                break
            seq.append(nxt.pop())
        full = seq
        n = len(full)
        for h, t in urows:
            k = len(h)
            ok = (h + [t] == full[: k + 1]) or (
                k == hist_cap and any(full[j - k: j] == h and full[j] == t for j in range(k, n))
            )
            inconsistent += not ok
        train_seq[u] = full
    report.skip("training rows that fit no consistent sequence of their user (ignored)", inconsistent)

    def restore(h: list[int], expected: list[int]) -> tuple[list[int], str]:
        if h == expected:
            return h, "same"
        if len(h) == hist_cap and len(expected) > hist_cap and h == expected[-hist_cap:]:
            return list(expected), "restored"
        return h, "differs"

    counts = {"restored": 0, "differs_valid": 0, "differs_test": 0}
    # users without training rows (history of length 1 at validation): their train sequence is the valid history
    from_valid = 0
    valid_hists = []
    for u, h in zip(va[0], va[1]):
        if u not in train_seq:
            train_seq[u] = list(h)
            order.append(u)
            from_valid += 1
        h2, how = restore(h, train_seq[u])
        counts["restored"] += how == "restored"
        counts["differs_valid"] += how == "differs"
        valid_hists.append(h2)
    valid_by_user = {u: (h, t) for u, h, t in zip(va[0], valid_hists, va[2])}
    test_hists = []
    for u, h in zip(te[0], te[1]):
        if u in valid_by_user:
            vh, vt = valid_by_user[u]
            h2, how = restore(h, vh + [vt])
        else:
            h2, how = h, "differs"
        counts["restored"] += how == "restored"
        counts["differs_test"] += how == "differs"
        test_hists.append(h2)
    if from_valid:
        report.notes.append(f"{from_valid} users without training rows: training sequence = valid history")
    if counts["restored"]:
        report.notes.append(
            f"{counts['restored']} valid/test histories were cut to their last {hist_cap} items in the files; "
            "restored to the full sequence"
        )
    report.skip("users whose valid history differs from their training sequence (file history kept)",
                counts["differs_valid"])
    report.skip("users whose test history is not valid history + valid target (file history kept)",
                counts["differs_test"])

    def ext_user(u: str) -> str:
        if user_names is not None and u.isdigit() and int(u) < len(user_names):
            return user_names[int(u)]
        return u

    def arr(ids: list[int]) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64) + 1

    train = [arr(train_seq[u]) for u in order]
    valid = Examples([arr(h) for h in valid_hists], arr(va[2]), [ext_user(u) for u in va[0]])
    test = Examples([arr(h) for h in test_hists], arr(te[2]), [ext_user(u) for u in te[0]])

    items = ItemTable(ids=item_ids)
    text_path = folder / f"{name}.text"
    if text_path.is_file():
        index = items.index()
        texts = [""] * items.n_items
        lines = read_lines(text_path)
        start = 1 if lines[0].split("\t")[0].strip().startswith("item_id") else 0
        unknown = 0
        for lineno, line in enumerate(lines[start:], start + 1):
            if not line.strip():
                continue
            parts = line.split("\t", 1)
            if len(parts) < 2:
                report.skip(f"{text_path.name}: rows without a tab-separated text column")
                continue
            i = index.get(parts[0].strip())
            if i is None:
                unknown += 1
                continue
            texts[i - 1] = parts[1].strip()
        report.skip(f"{text_path.name}: text rows for items not in the item table", unknown)
        items.text["text"] = texts

    if features:
        for suffix, fname in (("feat1CLS", "text_clip"), ("feat3CLS", "image_clip")):
            fp = folder / f"{name}.{suffix}"
            if not fp.is_file():
                continue
            raw = np.fromfile(fp, dtype=np.float32)
            if raw.size % feature_dim:
                raise DataError(
                    f"{fp}: {raw.size} float32 values is not a multiple of feature_dim={feature_dim}; "
                    "give the right option feature_dim or re-export the matrix as raw float32 [n_items, dim]"
                )
            items.add_features(fname, raw.reshape(-1, feature_dim), source=str(fp))

    protocol: dict[str, Any] = {
        "split": "leave_one_out (given files)",
        "source_format": "recbole_atomic",
        "files": name,
        "train": "full history per user rebuilt from the training rows",
    }
    return Dataset(
        name=name,
        items=items,
        train=train,
        valid=valid,
        test=test,
        train_users=[ext_user(u) for u in order],
        protocol=protocol,
        report=report,
    )


known_dataset("amazon2018-scientific-text", "recbole_atomic", "amazon2018-scientific-text", stem="Scientific")
known_dataset("amazon2018-scientific-mm", "recbole_atomic", "amazon2018-scientific-mm", stem="Scientific")
