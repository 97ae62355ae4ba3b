"""S3-Rec style ``<Name>.txt`` files: ``user item item ...`` per line, chronological, item ids from 1.

The split is per-user leave-one-out (last item = test target, second-last = valid target), the standard of S3-Rec,
CL4SRec, ICLRec, DuoRec and P5. Item k of the file keeps internal id k (so results stay comparable with those
papers); the numbering is checked to be dense 1..n and gaps are noted.

Optional item side information: ``*_item_meta.tsv`` with a header naming ``item_id`` and any of ``asin``,
``attributes`` (``brand|category|...`` names -> text field "attributes") and ``idgen_textual_id`` (text field
"textual_id"). The external id of an item is its ASIN when the meta file gives one, else its number.
Numeric attribute ids (``s3rec_attribute_ids``) carry no words and are not turned into text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..dataset import DataError, Dataset, ItemTable, LoadReport, leave_one_out
from . import known_dataset, register_loader
from .recbole_atomic import as_folder, find_one, header_columns, parse_int, parse_ints, read_lines


def _read_meta(path: Path, report: LoadReport) -> dict[int, dict[str, str]]:
    lines = read_lines(path)
    cols = header_columns(lines[0], path, "\t", ["item_id"])
    out: dict[int, dict[str, str]] = {}
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t")
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


@register_loader("s3rec")
def load_s3rec(path: Path | str | None = None, *, stem: str | None = None, meta: str | None = None) -> Dataset:
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
    top = 0
    for lineno, line in enumerate(read_lines(seq_path), 1):
        if not line.strip():
            continue
        user, _, rest = line.strip().partition(" ")
        ids = parse_ints(rest, seq_path, lineno, "item list")
        if not ids:
            report.skip("users without items")
            continue
        lo = min(ids)
        if lo < 1:
            raise DataError(
                f"{seq_path}, line {lineno}: item id {lo}; S3-Rec item ids start at 1 (0 is padding), "
                "shift the ids by one"
            )
        top = max(top, max(ids))
        users.append(user)
        seqs.append(np.asarray(ids, dtype=np.int64))
    if not seqs:
        raise DataError(f"{seq_path}: no user has any item; each line must be 'user item item ...'")

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
    return leave_one_out(
        seq_path.stem, items, seqs, users,
        protocol={"source_format": "s3rec", "file": seq_path.name, "item_ids": "file numbering kept"},
        report=report,
    )


known_dataset("amazon2014-beauty", "s3rec", "amazon2014-beauty", stem="Beauty")
known_dataset("amazon2014-sports", "s3rec", "amazon2014-sports", stem="Sports_and_Outdoors")
