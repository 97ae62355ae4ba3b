"""MicroLens pairs: ``<...>pairs.tsv`` ("user \\t item item ...", chronological) + ``<...>titles.csv`` (item,title).

Per-user leave-one-out. Items are the ids that occur in the sequences, in numeric order (internal id = rank);
the item's external id is its MicroLens id as a string and its text field "title" comes from the CSV.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..dataset import DataError, Dataset, ItemTable, LoadReport, leave_one_out
from . import known_dataset, register_loader
from ._io import TextRows, as_folder, find_one, iter_lines, parse_ints


@register_loader("microlens")
def load_microlens(path: Path | str | None = None, *, pairs: str | None = None, titles: str | None = None) -> Dataset:
    folder = as_folder(path, "microlens")
    pairs_path = folder / pairs if pairs else find_one(folder, "*pairs.tsv", "MicroLens pairs", "pairs")
    report = LoadReport()
    users: list[str] = []
    raw: list[list[int]] = []
    for lineno, parts in TextRows(pairs_path, "\t", maxsplit=1, report=report):
        if len(parts) < 2:
            raise DataError(
                f"{pairs_path}, line {lineno}: no tab after the user id; each line must be 'user\\titem item ...'"
            )
        ids = parse_ints(parts[1], pairs_path, lineno, "item list")
        if not ids:
            report.skip("users without items")
            continue
        users.append(parts[0].strip())
        raw.append(ids)
    if not raw:
        raise DataError(f"{pairs_path}: no user has any item; each line must be 'user\\titem item ...'")
    uniq = np.unique(np.concatenate([np.asarray(r, dtype=np.int64) for r in raw]))
    lookup = {int(e): i + 1 for i, e in enumerate(uniq)}
    seqs = [np.fromiter((lookup[i] for i in r), dtype=np.int64, count=len(r)) for r in raw]
    items = ItemTable(ids=[str(int(e)) for e in uniq])

    titles_path = folder / titles if titles else next(iter(sorted(folder.glob("*titles.csv"))), None)
    if titles_path is not None:
        # csv reads quoted titles that span lines; every line goes to it, and row numbers are file lines
        reader = csv.reader(line + "\n" for _, line in iter_lines(titles_path, skip_blank=False))
        header = [h.strip().lower() for h in next(reader)]
        if "item" not in header or "title" not in header:
            raise DataError(
                f"{titles_path}, line 1: header {header} must name the columns 'item' and 'title' (CSV, quoted titles)"
            )
        ci, ct = header.index("item"), header.index("title")
        text = [""] * items.n_items
        unknown = 0
        for row in reader:
            rowno = reader.line_num
            if not row:
                continue
            if len(row) <= max(ci, ct):
                report.skip(f"{titles_path.name}: rows with too few columns")
                continue
            try:
                k = lookup.get(int(row[ci]))
            except ValueError:
                raise DataError(
                    f"{titles_path}, row {rowno}: item '{row[ci][:40]}' is not an integer id; give the MicroLens item id"
                ) from None
            if k is None:
                unknown += 1
                continue
            text[k - 1] = row[ct].strip()
        report.skip(f"{titles_path.name}: titles of items in no sequence", unknown)
        items.text["title"] = text
    else:
        report.notes.append("no *titles.csv: items have ids only")
    return leave_one_out(
        pairs_path.stem, items, seqs, users,
        protocol={"source_format": "microlens", "file": pairs_path.name, "item_ids": "sorted MicroLens ids"},
        report=report,
    )


known_dataset("microlens-50k", "microlens", "microlens-50k")
