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

A ``.inter`` row with more fields than its header names is an error naming the line; further columns named in the
header are not used (noted in the load report).

Without ``<Name>.item2index`` the indices must be non-negative and dense enough to be used as indices (see
``_io.dense_id_limit``); a negative or far-too-large index is an error naming its file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import DataError, Dataset, Examples, ItemTable, LoadReport
from . import known_dataset, register_loader
from ._io import TextRows, as_folder, check_dense_ids, find_one, parse_int, parse_ints, require_file

# --------------------------------------------------------------------------------------------------------------------
# the loader


def _read_index(path: Path, what: str, report: LoadReport) -> list[str]:
    """``<ext id> \\t <0-based index>`` -> list of external ids in index order."""
    pairs: dict[int, str] = {}
    where: dict[int, int] = {}
    for lineno, parts in TextRows(path, "\t", report=report):
        if len(parts) != 2:
            raise DataError(f"{path}, line {lineno}: expected '<{what} id>\\t<index>', got {len(parts)} column(s)")
        if lineno == 1 and not parts[1].strip().lstrip("-").isdigit():
            continue  # a header row
        idx = parse_int(parts[1].strip(), path, lineno, "index")
        if idx in pairs:
            raise DataError(f"{path}, line {lineno}: index {idx} is given twice; each index must appear once")
        pairs[idx] = parts[0].strip()
        where[idx] = lineno
    n = len(pairs)
    if n and (min(pairs) != 0 or max(pairs) != n - 1):
        bad = min(pairs) if min(pairs) != 0 else max(pairs)
        raise DataError(
            f"{path}, line {where[bad]}: index {bad}; the indices run {min(pairs)}..{max(pairs)} for {n} rows and "
            f"must be dense 0..{n - 1}"
        )
    return [pairs[i] for i in range(n)]


def _read_inter(path: Path, n_items: int | None, report: LoadReport
                ) -> tuple[list[str], list[list[int]], list[int], tuple[int, int]]:
    """(users, histories, targets, (largest item index, its line)) of one ``.inter`` file."""
    rows = TextRows(path, "\t", header=True, report=report)
    cols = rows.columns(["user_id", "item_id_list", "item_id"])
    cu, cl, ci = cols["user_id"], cols["item_id_list"], cols["item_id"]
    width = max(cu, cl, ci) + 1
    unused = rows.unused_columns(["user_id", "item_id_list", "item_id"])
    if unused:
        report.notes.append(f"{path.name}: column(s) {unused} of the header are not used")
    users, hists, targets = [], [], []
    top, top_line = -1, 0
    for lineno, parts in rows:
        rows.check_width(lineno, parts, "each row holds the header's columns and no more (remove the extra field, "
                                        "or name its column in the header)")
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
        else:
            lo, hi = min(tgt, *hist), max(tgt, *hist)
            if lo < 0:
                raise DataError(
                    f"{path}, line {lineno}: item index {lo} is negative; item indices are 0-based (0, 1, 2, ...): "
                    "renumber the items, or give <Name>.item2index mapping item ids to indices"
                )
            if hi > top:
                top, top_line = hi, lineno
        users.append(parts[cu].strip())
        hists.append(hist)
        targets.append(tgt)
    return users, hists, targets, (top, top_line)


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
        item_ids = _read_index(folder / f"{name}.item2index", "item", report)
    user_names: list[str] | None = None
    if (folder / f"{name}.user2index").is_file():
        user_names = _read_index(folder / f"{name}.user2index", "user", report)

    n_known = len(item_ids) if item_ids is not None else None
    parts = {p: folder / f"{name}.{p}.inter" for p in ("train", "valid", "test")}
    tr, va, te = (_read_inter(parts[p], n_known, report) for p in ("train", "valid", "test"))
    if item_ids is None:
        top = max(part[3][0] for part in (tr, va, te))
        top_line, top_path = next((part[3][1], path) for part, path in zip((tr, va, te), parts.values())
                                  if part[3][0] == top)
        if top > 0:
            distinct = len({i for part in (tr, va, te) for h in part[1] for i in h}
                           | {i for part in (tr, va, te) for i in part[2]})
            check_dense_ids(top, distinct, top_path, top_line, "item index",
                            f"renumber the items 0..n-1, or give {name}.item2index mapping item ids to indices")
        item_ids = [str(i) for i in range(top + 1)]
        report.notes.append(f"no {name}.item2index: item ids are the file indices")

    # training sequences. The files may cut histories to their last L items (UniSRec: L = 50), so a user's
    # sequence is rebuilt as: the longest row with an uncut history, then extended by every row whose (cut)
    # history equals the last L items built so far. Rows that fit nowhere are counted.
    hist_cap = max((len(h) for part in (tr, va, te) for h in part[1]), default=0)
    order: list[str] = []
    rows: dict[str, list[tuple[list[int], int]]] = {}
    for u, h, t in zip(*tr[:3]):
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
        unknown = 0
        for lineno, parts in TextRows(text_path, "\t", maxsplit=1, report=report):
            if lineno == 1 and parts[0].strip().startswith("item_id"):
                continue  # the header
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
