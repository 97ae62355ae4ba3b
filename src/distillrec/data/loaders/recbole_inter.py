"""A raw RecBole interaction file (``<name>.inter``), ordered and split exactly as RecBole 1.2.1 does.

File: tab-separated with a typed header, e.g. RecBole's bundled ml-100k::

    user_id:token \t item_id:token \t rating:float \t timestamp:float

A row with more fields than the header names is an error naming the line (an extra field would shift into the
timestamp's place); columns the header names besides these three (e.g. ``rating``) are not used, noted in the load
report. Every row is a positive (no rating threshold, no k-core, duplicates kept; RecBole's ``val_interval: ~``,
``*_inter_num_interval: ~``, ``rm_dup_inter: ~``). Each user's items are ordered the way RecBole orders them for
``eval_args: {order: TO}``: RecBole min-max-normalises every float column (``normalize_all: True``, the ml-100k
default) in float64 and stores it as **float32**, then stable-sorts by that value, so equal float32 values keep file
order. Sorting the raw timestamps, or breaking ties by item id, changes the valid/test target of hundreds of ml-100k
users. The split is per-user leave-one-out (RecBole's ``split: {LS: valid_and_test}``): last item = test target,
second-last = valid target, the rest = training. User and item ids are tokens (any text, as in RecBole), mapped
through a dictionary in order of first appearance: no id is used as an index, so a huge or negative id is just a token.

Options: ``stem`` (the file is ``<folder>/<stem>.inter``; default: the single ``*.inter`` in the folder, or the
path itself when it is a file); ``normalize`` (default True: order by RecBole's float32-normalised timestamp; False:
by the raw float64 value, for files whose timestamps are plain positions). With no path, the ml-100k copy inside an
installed ``recbole`` package is used when one can be found (without importing recbole).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..dataset import DataError, Dataset, ItemTable, LoadReport, leave_one_out
from . import known_dataset, register_loader
from ._io import TextRows, find_one


def bundled_ml100k() -> Path | None:
    """``recbole/dataset_example/ml-100k`` of the recbole installed in this Python, if any."""
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "dataset_example" / "ml-100k"
        if (p / "ml-100k.inter").is_file():
            return p
    return None


def recbole_time_order(timestamps: np.ndarray, normalize: bool = True) -> np.ndarray:
    """The sort key RecBole uses: float32((t - min) / (max - min)) computed in float64 (or t itself)."""
    t = np.asarray(timestamps, dtype=np.float64)
    if not normalize or len(t) == 0:
        return t
    mn, mx = t.min(), t.max()
    if mx == mn:
        return np.ones(len(t), dtype=np.float32)
    return ((t - mn) / (mx - mn)).astype(np.float32)


@register_loader("recbole_inter")
def load_recbole_inter(path: Path | str | None = None, *, stem: str | None = None, normalize: bool = True) -> Dataset:
    if path is None:
        path = bundled_ml100k()
        if path is None:
            raise DataError(
                "format 'recbole_inter' needs a path: give dataset.path (a RecBole .inter file or its folder); "
                "for ml-100k, the folder recbole/dataset_example/ml-100k of a recbole installation"
            )
        stem = stem or "ml-100k"
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: does not exist; give a RecBole .inter file or the folder that holds it")
    if p.is_file():
        inter = p
    elif stem:
        inter = p / f"{stem}.inter"
        if not inter.is_file():
            raise DataError(f"{inter}: file not found; the option 'stem' names <stem>.inter in the folder")
    else:
        inter = find_one(p, "*.inter", "RecBole interaction", "stem")

    report = LoadReport()
    rows = TextRows(inter, "\t", header=True, report=report)
    cols = rows.columns(["user_id", "item_id", "timestamp"])
    cu, ci, ct = cols["user_id"], cols["item_id"], cols["timestamp"]
    width = max(cu, ci, ct) + 1
    unused = rows.unused_columns(["user_id", "item_id", "timestamp"])
    if unused:
        report.notes.append(f"{inter.name}: column(s) {unused} are not used (every row is a positive)")
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    for lineno, parts in rows:
        rows.check_width(lineno, parts, "each row holds the header's columns and no more (remove the extra field, "
                                        "or name its column in the header)")
        if len(parts) < width:
            raise DataError(
                f"{inter}, line {lineno}: {len(parts)} tab-separated column(s), the header names at least {width}; "
                "each row needs user_id, item_id and timestamp"
            )
        u, i, t = parts[cu].strip(), parts[ci].strip(), parts[ct].strip()
        if not u or not i:
            report.skip("rows without a user_id or item_id (RecBole drops them too)")
            continue
        try:
            times.append(float(t))
        except ValueError:
            raise DataError(f"{inter}, line {lineno}: timestamp '{t[:40]}' is not a number") from None
        users.append(u)
        items.append(i)

    item_index: dict[str, int] = {}
    for i in items:
        if i not in item_index:
            item_index[i] = len(item_index) + 1
    key = recbole_time_order(np.asarray(times), normalize)
    item_ids = np.fromiter((item_index[i] for i in items), dtype=np.int64, count=len(items))
    rows_of: dict[str, list[int]] = {}
    for r, u in enumerate(users):
        rows_of.setdefault(u, []).append(r)
    user_names, seqs, seq_times = [], [], []
    raw_t = np.asarray(times, dtype=np.float64)
    for u, rows in rows_of.items():
        rows_a = np.asarray(rows, dtype=np.int64)
        order = rows_a[np.argsort(key[rows_a], kind="stable")]  # ties keep file order, as RecBole
        user_names.append(u)
        seqs.append(item_ids[order])
        seq_times.append(raw_t[order])

    table = ItemTable(ids=list(item_index))
    return leave_one_out(
        inter.stem,
        table,
        seqs,
        user_names,
        timestamps=seq_times,
        protocol={
            "source_format": "recbole_inter",
            "file": inter.name,
            "order": "stable sort on RecBole's float32 min-max-normalised timestamp, ties in file order"
            if normalize else "stable sort on the timestamp column, ties in file order",
            "implicit": "every row a positive; no filtering, duplicates kept",
        },
        report=report,
    )


known_dataset("ml-100k", "recbole_inter", None, stem="ml-100k")
