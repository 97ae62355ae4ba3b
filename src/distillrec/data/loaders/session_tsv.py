"""Session TSV files: ``<prefix>_train.tsv`` / ``<prefix>_test.tsv`` with header ``session_prefix\\ttarget``.

Each row is ``space-separated session prefix \\t next item``. Two kinds of training files exist:
- prefix-augmented (SR-GNN style): every prefix of every session is a row. The loader rebuilds the maximal sessions
  (rows whose ``prefix + [target]`` is not a proper prefix of another row's) and keeps each as one training sequence;
- one row per session (the MMSBR / DIMO / MACL files: ``session[:-1] -> session[-1]``): each row is one session.
``augmented="auto"`` (default) decides from the data: the file is augmented when most rows of length >= 3 have their
one-shorter prefix present as a row too. The choice is recorded in the protocol.

Validation: the last ``valid_fraction`` (default 10%) of the training sessions, by order in the file, are taken out
of train; their rows become the valid Examples (all prefixes when augmented, one per session otherwise) - the same
shape as the test rows, which are used as given. Item ids are the numeric ids of the files (as strings);
when they are positive integers and dense enough (the largest at most ``_io.dense_id_limit`` of the number of
distinct ids) the numbering is kept (internal id = file id); otherwise (an id 0, or sparse ids such as raw
YOOCHOOSE ids) the internal id is the rank of the numeric id, noted in the load report.

Files: ``<prefix>_train.tsv`` and ``<prefix>_test.tsv`` in one folder (``prefix``: default the single
``*_train.tsv``); the first line of each is the header ``session_prefix<TAB>target``, then one row per line. A row
with more fields than the header names is an error naming its line; further columns named in the header are not
used (noted in the load report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import DataError, Dataset, Examples, ItemTable, LoadReport
from . import known_dataset, register_loader
from ._io import TextRows, as_folder, dense_id_limit, find_one


def _read_rows(path: Path, report: LoadReport) -> list[list[str]]:
    rows = TextRows(path, "\t", header=True, report=report)
    cols = rows.columns(["session_prefix", "target"], strip_types=False)
    cp, ct = cols["session_prefix"], cols["target"]
    unused = rows.unused_columns(["session_prefix", "target"])
    if unused:
        report.notes.append(f"{path.name}: column(s) {unused} of the header are not used")
    out = []
    for lineno, parts in rows:
        rows.check_width(lineno, parts, "each row must be 'prefix item ids<TAB>target item id' (remove the extra "
                                        "field, or name its column in the header)")
        if len(parts) <= max(cp, ct):
            raise DataError(
                f"{path}, line {lineno}: {len(parts)} column(s); each row must be 'prefix item ids\\ttarget item id'"
            )
        prefix = parts[cp].split()
        target = parts[ct].strip()
        if not prefix or not target or " " in target:
            raise DataError(
                f"{path}, line {lineno}: needs a non-empty prefix and exactly one target item, got "
                f"prefix '{parts[cp][:40]}' and target '{target[:40]}'"
            )
        for tok in (*prefix, target):
            if not tok.isdigit():
                raise DataError(
                    f"{path}, line {lineno}: item id '{tok[:40]}' is not a non-negative integer; "
                    "session files hold numeric item ids"
                )
        prefix.append(target)
        out.append(prefix)
    if not out:
        raise DataError(f"{path}: header only, no rows; give rows 'prefix\\ttarget'")
    return out


def _is_augmented(fulls: list[tuple[str, ...]]) -> bool:
    present = set(fulls)
    longer = [f for f in fulls if len(f) >= 3]
    if not longer:
        return False
    hits = sum(f[:-1] in present for f in longer)
    return hits > 0.5 * len(longer)


def _maximal(fulls: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Rows that are no proper prefix of another row, in order of first occurrence, with their multiplicity."""
    proper: set[tuple[str, ...]] = set()
    for f in set(fulls):
        for k in range(2, len(f)):
            proper.add(f[:k])
    return [f for f in fulls if f not in proper]


@register_loader("session_tsv")
def load_session_tsv(path: Path | str | None = None, *, prefix: str | None = None, valid_fraction: float = 0.1,
                     augmented: bool | str = "auto") -> Dataset:
    folder = as_folder(path, "session_tsv")
    if not 0 <= valid_fraction < 1:
        raise DataError(f"option valid_fraction={valid_fraction}: give a fraction in [0, 1)")
    if prefix:
        train_path = folder / f"{prefix}_train.tsv"
    else:
        train_path = find_one(folder, "*_train.tsv", "session training", "prefix")
        prefix = train_path.name[: -len("_train.tsv")]
    test_path = folder / f"{prefix}_test.tsv"
    for p in (train_path, test_path):
        if not p.is_file():
            raise DataError(f"{p}: file not found; the folder must hold {prefix}_train.tsv and {prefix}_test.tsv")
    report = LoadReport()
    train_rows = [tuple(r) for r in _read_rows(train_path, report)]
    test_rows = _read_rows(test_path, report)

    if augmented == "auto":
        aug = _is_augmented(train_rows)
    elif isinstance(augmented, bool):
        aug = augmented
    else:
        raise DataError(f"option augmented={augmented!r}: give true, false or 'auto'")
    if aug:
        counts: dict[tuple[str, ...], int] = {}
        for f in train_rows:
            counts[f] = counts.get(f, 0) + 1
        sessions = _maximal(train_rows)
        report.notes.append(f"training rows are prefix-augmented: {len(sessions)} sessions rebuilt "
                            f"from {len(train_rows)} rows")
    else:
        sessions = list(train_rows)

    # item numbering: keep the file ids when they are positive integers and dense enough, else rank them
    all_ids = {t for s in sessions for t in s} | {t for r in test_rows for t in r}
    nums = sorted(set(int(t) for t in all_ids))
    if nums and nums[0] >= 1 and nums[-1] <= dense_id_limit(len(nums)):
        n = nums[-1]
        ids = [str(k) for k in range(1, n + 1)]
        lookup = {str(k): k for k in range(1, n + 1)}
        # ids written with leading zeros map by value
        for t in all_ids:
            lookup.setdefault(t, int(t))
        if len(nums) < n:
            report.notes.append(f"{n - len(nums)} of the item ids 1..{n} occur in no row")
    else:
        ids = [str(k) for k in nums]
        lookup = {t: i + 1 for i, t in enumerate(ids)}
        for t in all_ids:
            lookup.setdefault(t, lookup[str(int(t))])
        if nums and nums[0] < 1:
            report.notes.append("item ids include 0: internal id = rank of the numeric id")
        else:
            report.notes.append(f"item ids are sparse (largest {nums[-1]} for {len(nums)} distinct ids): "
                                "internal id = rank of the numeric id")

    def arr(seq) -> np.ndarray:
        return np.fromiter((lookup[t] for t in seq), dtype=np.int64, count=len(seq))

    n_valid = int(round(len(sessions) * valid_fraction))
    train_sess, valid_sess = sessions[: len(sessions) - n_valid], sessions[len(sessions) - n_valid:]
    train = [arr(s) for s in train_sess]
    if aug:
        valid = Examples.from_sequences([arr(s) for s in valid_sess],
                                        [f"valid-{i}" for i in range(len(valid_sess))])
    else:
        valid = Examples([arr(s[:-1]) for s in valid_sess],
                         np.asarray([lookup[s[-1]] for s in valid_sess], dtype=np.int64),
                         [f"valid-{i}" for i in range(len(valid_sess))])
    test = Examples([arr(r[:-1]) for r in test_rows], np.asarray([lookup[r[-1]] for r in test_rows], np.int64),
                    [f"test-{i}" for i in range(len(test_rows))])
    protocol: dict[str, Any] = {
        "split": "given train/test files (session-based)",
        "source_format": "session_tsv",
        "files": prefix,
        "train_rows_augmented": aug,
        "valid": f"last {valid_fraction:g} of the training sessions by file order",
        "test": "rows as given",
    }
    return Dataset(
        name=prefix,
        items=ItemTable(ids=ids),
        train=train,
        valid=valid,
        test=test,
        train_users=[f"train-{i}" for i in range(len(train))],
        protocol=protocol,
        report=report,
    )


known_dataset("amazon-cellphones-sessions", "session_tsv", "amazon-cellphones-sessions")
