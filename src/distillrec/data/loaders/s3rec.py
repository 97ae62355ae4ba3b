"""S3-Rec style ``<Name>.txt`` files: ``user item item ...`` per line, chronological, item ids from 1.

The split is per-user leave-one-out (last item = test target, second-last = valid target), the standard of S3-Rec,
CL4SRec, ICLRec, DuoRec and P5. Item k of the file keeps internal id k (so results stay comparable with those
papers); the numbering is checked to be dense 1..n and gaps are noted.

Optional item side information: ``*_item_meta.tsv`` with a header naming ``item_id`` and any of ``asin``,
``attributes`` (``brand|category|...`` names -> text field "attributes") and ``idgen_textual_id`` (text field
"textual_id"). The external id of an item is its ASIN when the meta file gives one, else its number.
Numeric attribute ids (``s3rec_attribute_ids``) carry no words and are not turned into text.

The S3-Rec repositories' own ``<stem>_item2attributes.json`` (a JSON object ``{"item id": [attribute id, ...]}``,
brand and category ids), when it lies beside the sequence file, becomes the multi-hot item feature
``attributes_onehot``: a float32 ``[n_items + 1, n_attributes]`` matrix, column j = the j-th smallest attribute id
(S3-Rec's ids 1..A give column j-1 = attribute j), 1.0 where the item has the attribute, row 0 = padding. Option
``item2attributes``: a file name in the folder instead, or ``false`` to skip it (the Sports matrix is 18,358 x 2,277,
167 MB). Entries for items in no sequence are counted and skipped; the report notes the feature.

Item ids are used as dense indices: an id far beyond the number of distinct ids (``_io.dense_id_limit``) is an error
naming the file and line, as is an id below 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..dataset import DataError, Dataset, ItemTable, LoadReport, leave_one_out
from . import known_dataset, register_loader
from ._io import TextRows, as_folder, check_dense_ids, find_one, parse_int, parse_ints, read_lines

ATTRIBUTE_FEATURE = "attributes_onehot"


def _read_meta(path: Path, report: LoadReport) -> dict[int, dict[str, str]]:
    rows = TextRows(path, "\t", header=True, report=report)
    cols = rows.columns(["item_id"])
    out: dict[int, dict[str, str]] = {}
    for lineno, parts in rows:
        if cols["item_id"] >= len(parts):
            raise DataError(
                f"{path}, line {lineno}: {len(parts)} tab-separated column(s), the item_id column is number "
                f"{cols['item_id'] + 1}; each row needs the columns of the header"
            )
        k = parse_int(parts[cols["item_id"]].strip(), path, lineno, "item_id")
        if k in out:
            report.skip(f"{path.name}: repeated item_id rows (first kept)")
            continue
        row = {}
        for col in ("asin", "attributes", "idgen_textual_id"):
            if col in cols and cols[col] < len(parts):
                row[col] = parts[cols[col]].strip()
        out[k] = row
    return out


def _int_id(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _read_item2attributes(path: Path, n: int, report: LoadReport) -> np.ndarray:
    """``{"item id": [attribute id, ...]}`` -> multi-hot float32 ``[n, n_attributes]`` (row k-1 = item k)."""
    text = "\n".join(read_lines(path, skip_blank=False, expect="a JSON object {item id: [attribute ids]}"))
    fix = 'the file must be one JSON object {"item id": [attribute id, ...]}, as S3-Rec\'s <Name>_item2attributes.json'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the JSON is a {type(data).__name__}, not an object; {fix}")
    rows: dict[int, list[int]] = {}
    outside = 0
    for key, attrs in data.items():
        k = _int_id(key)
        if k is None:
            raise DataError(f"{path}: item '{str(key)[:40]}' is not an integer item id; {fix}")
        if not isinstance(attrs, list):
            raise DataError(f"{path}: item '{key}': the attributes are a {type(attrs).__name__}, not a list; {fix}")
        ids = [_int_id(a) for a in attrs]
        if any(a is None for a in ids):
            bad = next(a for a, i in zip(attrs, ids) if i is None)
            raise DataError(f"{path}: item '{key}': attribute {str(bad)[:40]!r} is not an integer id; {fix}")
        if not 1 <= k <= n:
            outside += 1
            continue
        rows[k] = ids  # type: ignore[assignment]
    report.skip(f"{path.name}: attribute entries for item ids not in any sequence (ignored)", outside)
    columns = {a: j for j, a in enumerate(sorted({a for ids in rows.values() for a in ids}))}
    mat = np.zeros((n, len(columns)), dtype=np.float32)
    for k, ids in rows.items():
        mat[k - 1, [columns[a] for a in ids]] = 1.0
    note = (f"{path.name}: item attributes -> feature '{ATTRIBUTE_FEATURE}' (multi-hot, {len(columns)} attribute ids, "
            f"column j = the j-th smallest id); {len(rows)} of {n} items have attributes")
    report.notes.append(note)
    return mat


@register_loader("s3rec")
def load_s3rec(path: Path | str | None = None, *, stem: str | None = None, meta: str | None = None,
               item2attributes: str | bool | None = None) -> Dataset:
    folder = as_folder(path, "s3rec")
    if stem:
        seq_path = folder / f"{stem}.txt"
        if not seq_path.is_file():
            raise DataError(f"{seq_path}: file not found; give the option 'stem' as the name of <stem>.txt")
    else:
        seq_path = find_one(folder, "*.txt", "S3-Rec sequence", "stem", exclude=("_textual_id.txt", "SOURCE.txt"))
    report = LoadReport()
    users: list[str] = []
    seqs: list[np.ndarray] = []
    top, top_line = 0, 0
    for lineno, parts in TextRows(seq_path, None, report=report, expect="lines 'user item item ...'"):
        user = parts[0]
        ids = parse_ints(parts[1:], seq_path, lineno, "item list")
        if not ids:
            report.skip("users without items")
            continue
        lo, hi = min(ids), max(ids)
        if lo < 1:
            raise DataError(
                f"{seq_path}, line {lineno}: item id {lo}; S3-Rec item ids start at 1 (0 is padding), "
                "shift the ids by one"
            )
        if hi > top:
            top, top_line = hi, lineno
        users.append(user)
        seqs.append(np.asarray(ids, dtype=np.int64))
    if not seqs:
        raise DataError(f"{seq_path}: no user has any item; each line must be 'user item item ...'")
    check_dense_ids(top, len(np.unique(np.concatenate(seqs))), seq_path, top_line, "item id",
                    "S3-Rec numbers the items densely 1..n: renumber them")

    meta_rows: dict[int, dict[str, str]] = {}
    meta_path = folder / meta if meta else next(iter(sorted(folder.glob("*_item_meta.tsv"))), None)
    if meta_path is not None:
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: meta file not found; fix the option 'meta' or remove it")
        meta_rows = _read_meta(meta_path, report)
        extra = [k for k in meta_rows if k < 1 or k > top]
        report.skip(f"{meta_path.name}: meta rows for item ids not in any sequence", len(extra))
    else:
        report.notes.append("no *_item_meta.tsv: items have ids only")
    n = top
    seen = np.zeros(n + 1, dtype=bool)
    for s in seqs:
        seen[s] = True
    gaps = int(n - seen[1:].sum())
    if gaps:
        report.notes.append(f"item numbering is not dense: {gaps} of the ids 1..{n} occur in no sequence")

    ids = []
    for k in range(1, n + 1):
        asin = meta_rows.get(k, {}).get("asin", "")
        ids.append(asin or str(k))
    if len(set(ids)) != len(ids):
        report.notes.append("some ASINs repeat in the meta file; external ids are the item numbers")
        ids = [str(k) for k in range(1, n + 1)]
    items = ItemTable(ids=ids)
    if any("attributes" in r for r in meta_rows.values()):
        items.text["attributes"] = [
            ", ".join(a for a in meta_rows.get(k, {}).get("attributes", "").split("|") if a) for k in range(1, n + 1)
        ]
    if any("idgen_textual_id" in r for r in meta_rows.values()):
        items.text["textual_id"] = [meta_rows.get(k, {}).get("idgen_textual_id", "") for k in range(1, n + 1)]

    attr_path: Path | None = None
    if isinstance(item2attributes, str) and item2attributes:
        attr_path = folder / item2attributes
        if not attr_path.is_file():
            raise DataError(f"{attr_path}: item2attributes file not found; fix the option 'item2attributes' "
                            "(a file name in the dataset folder) or remove it")
    elif item2attributes is None or item2attributes is True:
        cand = folder / f"{seq_path.stem}_item2attributes.json"
        if cand.is_file():
            attr_path = cand
        elif item2attributes is True:
            raise DataError(f"{cand}: file not found; the option item2attributes=true needs "
                            f"{seq_path.stem}_item2attributes.json beside {seq_path.name}")
    if attr_path is not None:
        items.add_features(ATTRIBUTE_FEATURE, _read_item2attributes(attr_path, n, report), source=str(attr_path))
    return leave_one_out(
        seq_path.stem, items, seqs, users,
        protocol={"source_format": "s3rec", "file": seq_path.name, "item_ids": "file numbering kept"},
        report=report,
    )


known_dataset("amazon2014-beauty", "s3rec", "amazon2014-beauty", stem="Beauty")
known_dataset("amazon2014-sports", "s3rec", "amazon2014-sports", stem="Sports_and_Outdoors")
