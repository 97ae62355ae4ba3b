"""Raw click logs: DIGINETICA (``session_id;user_id;item_id;timeframe;eventdate``) and YOOCHOOSE
(``SessionId\\tItemId\\tTime``), preprocessed the SR-GNN / session-rec way.

DIGINETICA (SR-GNN ``preprocess.py``):
1. events grouped by session and sorted by ``timeframe``; a session's date is its latest ``eventdate``;
2. sessions of length 1 dropped; items seen fewer than ``min_item_count`` (5) times over all sessions removed,
   then sessions shorter than 2 dropped (one pass, as SR-GNN; ``iterate_filter=True`` repeats until stable);
3. test = sessions dated after ``max_date - test_days`` (default 7 days); valid = the training sessions dated after
   ``max_train_date - valid_days`` (default 7), or the last ``valid_fraction`` of them by date when that is given;
4. items are those of the training sessions; valid/test items unseen in training are dropped and valid/test
   sessions left shorter than 2 dropped (both counted);
5. valid/test Examples = every prefix of each session (SR-GNN augmentation).

YOOCHOOSE (session-rec's prepared files ``*_train_tr.txt`` / ``*_train_valid.txt`` / ``*_test.txt``): train =
train_tr, valid = train_valid, test = test (``use_train_full=True``: train = ``*_train_full.txt`` and no valid set).
Sessions are sorted by time, training sessions shorter than 2 dropped, unseen valid/test items filtered as above.
Items have no side information: the item table holds ids only.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import DataError, Dataset, Examples, ItemTable, LoadReport
from . import known_dataset, register_loader
from ._io import TextRows, as_folder, find_one

_DAY = 86400.0


def _norm(col: str) -> str:
    return col.strip().lower().replace("_", "")


def _columns(line: str, path: Path, sep: str, required: dict[str, str], lineno: int = 1) -> dict[str, int]:
    names = [_norm(c) for c in line.split(sep)]
    cols = {}
    for key, shown in required.items():
        if key not in names:
            raise DataError(
                f"{path}, line {lineno}: header {line.split(sep)} lacks the column '{shown}'; the first line must "
                f"name the columns {list(required.values())} separated by {sep!r}"
            )
        cols[key] = names.index(key)
    return cols


def _sessions(events: dict[str, list[tuple[float, int, str]]]) -> dict[str, list[str]]:
    return {s: [it for _, _, it in sorted(ev)] for s, ev in events.items()}


def _filter_eval(sessions: list[tuple[str, list[str]]], known: dict[str, int], report: LoadReport, part: str
                 ) -> tuple[list[str], list[np.ndarray]]:
    users, seqs = [], []
    unseen = short = 0
    for sid, seq in sessions:
        kept = [known[i] for i in seq if i in known]
        unseen += len(seq) - len(kept)
        if len(kept) < 2:
            short += 1
            continue
        users.append(sid)
        seqs.append(np.asarray(kept, dtype=np.int64))
    report.skip(f"{part} clicks on items unseen in training", unseen)
    report.skip(f"{part} sessions shorter than 2 after removing unseen items", short)
    return users, seqs


def _item_table(train: list[list[str]]) -> dict[str, int]:
    known: dict[str, int] = {}
    for seq in train:
        for i in seq:
            if i not in known:
                known[i] = len(known) + 1
    return known


def _build(name: str, train: list[tuple[str, list[str]]], valid: list[tuple[str, list[str]]],
           test: list[tuple[str, list[str]]], report: LoadReport, protocol: dict[str, Any]) -> Dataset:
    known = _item_table([s for _, s in train])
    if not known:
        raise DataError(f"{name}: no training session is left after filtering; the log is too small for this split")
    vu, vs = _filter_eval(valid, known, report, "valid")
    tu, ts = _filter_eval(test, known, report, "test")
    return Dataset(
        name=name,
        items=ItemTable(ids=list(known)),
        train=[np.asarray([known[i] for i in s], dtype=np.int64) for _, s in train],
        valid=Examples.from_sequences(vs, vu),
        test=Examples.from_sequences(ts, tu),
        train_users=[u for u, _ in train],
        protocol=protocol,
        report=report,
    )


@register_loader("diginetica")
def load_diginetica(path: Path | str | None = None, *, file: str | None = None, test_days: float = 7,
                    valid_days: float | None = 7, valid_fraction: float | None = None, min_item_count: int = 5,
                    iterate_filter: bool = False) -> Dataset:
    folder = as_folder(path, "diginetica")
    csv_path = Path(path) if path is not None and Path(path).is_file() else (
        folder / file if file else find_one(folder, "*.csv", "DIGINETICA click log", "file"))
    report = LoadReport()
    rows = TextRows(csv_path, ";", header=True, report=report)
    cols = _columns(rows.header_line, csv_path, ";", {"sessionid": "session_id", "itemid": "item_id",
                                                      "timeframe": "timeframe", "eventdate": "eventdate"},
                    rows.header_lineno)
    cs, ci, ct, cd = cols["sessionid"], cols["itemid"], cols["timeframe"], cols["eventdate"]
    width = max(cols.values()) + 1
    events: dict[str, list[tuple[float, int, str]]] = {}
    dates: dict[str, str] = {}
    for lineno, parts in rows:
        if len(parts) < width:
            raise DataError(f"{csv_path}, line {lineno}: {len(parts)} ';'-separated field(s), the header names "
                            f"{width}; each row is session_id;user_id;item_id;timeframe;eventdate")
        sid, item, date = parts[cs].strip(), parts[ci].strip(), parts[cd].strip()
        try:
            tf = float(parts[ct])
        except ValueError:
            raise DataError(f"{csv_path}, line {lineno}: timeframe '{parts[ct][:30]}' is not a number") from None
        if not sid or not item:
            report.skip("events without session_id or item_id")
            continue
        events.setdefault(sid, []).append((tf, lineno, item))
        if date > dates.get(sid, ""):
            dates[sid] = date
    if not events:
        raise DataError(f"{csv_path}: no events; give rows session_id;user_id;item_id;timeframe;eventdate")
    day: dict[str, float] = {}
    for sid, d in dates.items():
        try:
            day[sid] = _dt.datetime.strptime(d, "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc).timestamp()
        except ValueError:
            raise DataError(f"{csv_path}: session {sid} has eventdate '{d}'; dates must be YYYY-MM-DD") from None
    sessions = _sessions(events)
    n_one = sum(len(s) == 1 for s in sessions.values())
    sessions = {k: s for k, s in sessions.items() if len(s) > 1}
    report.skip("sessions of length 1", n_one)
    while True:
        counts: dict[str, int] = {}
        for s in sessions.values():
            for i in s:
                counts[i] = counts.get(i, 0) + 1
        rare = {i for i, c in counts.items() if c < min_item_count}
        removed = 0
        new: dict[str, list[str]] = {}
        for k, s in sessions.items():
            kept = [i for i in s if i not in rare]
            removed += len(s) - len(kept)
            if len(kept) >= 2:
                new[k] = kept
        report.skip(f"clicks on items seen fewer than {min_item_count} times", removed)
        report.skip("sessions shorter than 2 after removing rare items", len(sessions) - len(new))
        sessions = new
        if not iterate_filter or not removed:
            break
    if not sessions:
        raise DataError(f"{csv_path}: no session is left after filtering (length >= 2, items seen >= "
                        f"{min_item_count} times); lower the option min_item_count or give more data")
    ordered = sorted(sessions, key=lambda k: (day[k], k))
    max_day = max(day[k] for k in ordered)
    split = max_day - test_days * _DAY
    train_ids = [k for k in ordered if day[k] <= split]
    test_ids = [k for k in ordered if day[k] > split]
    if valid_fraction is not None:
        n_valid = int(round(len(train_ids) * valid_fraction))
        valid_ids, train_ids = train_ids[len(train_ids) - n_valid:], train_ids[: len(train_ids) - n_valid]
        valid_rule = f"last {valid_fraction:g} of the training sessions by date"
    elif valid_days:
        vsplit = max((day[k] for k in train_ids), default=split) - valid_days * _DAY
        valid_ids = [k for k in train_ids if day[k] > vsplit]
        train_ids = [k for k in train_ids if day[k] <= vsplit]
        valid_rule = f"training sessions dated in the last {valid_days:g} days of the training period"
    else:
        valid_ids, valid_rule = [], "none"
    protocol = {
        "split": "time-based (SR-GNN diginetica preprocessing)",
        "source_format": "diginetica",
        "file": csv_path.name,
        "test_days": test_days,
        "valid": valid_rule,
        "min_item_count": min_item_count,
        "iterate_filter": iterate_filter,
        "eval_examples": "every prefix of each session",
    }
    return _build(csv_path.stem, [(k, sessions[k]) for k in train_ids], [(k, sessions[k]) for k in valid_ids],
                  [(k, sessions[k]) for k in test_ids], report, protocol)


def _read_yoochoose(path: Path, report: LoadReport) -> dict[str, list[str]]:
    rows = TextRows(path, "\t", header=True, report=report)
    cols = _columns(rows.header_line, path, "\t", {"sessionid": "SessionId", "itemid": "ItemId", "time": "Time"},
                    rows.header_lineno)
    cs, ci, ct = cols["sessionid"], cols["itemid"], cols["time"]
    width = max(cols.values()) + 1
    events: dict[str, list[tuple[float, int, str]]] = {}
    for lineno, parts in rows:
        if len(parts) < width:
            raise DataError(f"{path}, line {lineno}: {len(parts)} tab-separated field(s); each row is "
                            "SessionId\\tItemId\\tTime")
        try:
            t = float(parts[ct])
        except ValueError:
            raise DataError(f"{path}, line {lineno}: Time '{parts[ct][:30]}' is not a number (unix seconds)") from None
        events.setdefault(parts[cs].strip(), []).append((t, lineno, parts[ci].strip()))
    return _sessions(events)


@register_loader("yoochoose")
def load_yoochoose(path: Path | str | None = None, *, prefix: str | None = None,
                   use_train_full: bool = False) -> Dataset:
    folder = as_folder(path, "yoochoose")
    if not prefix:
        tp = find_one(folder, "*_test.txt", "YOOCHOOSE test", "prefix")
        prefix = tp.name[: -len("_test.txt")]
    names = {"train": "_train_full.txt" if use_train_full else "_train_tr.txt", "test": "_test.txt"}
    if not use_train_full:
        names["valid"] = "_train_valid.txt"
    report = LoadReport()
    parts = {}
    for part, suffix in names.items():
        p = folder / f"{prefix}{suffix}"
        if not p.is_file():
            raise DataError(f"{p}: file not found; the folder must hold {prefix}{suffix} "
                            "(session-rec's prepared files)")
        parts[part] = _read_yoochoose(p, report)
    train_all = list(parts["train"].items())  # file order
    train = [(k, s) for k, s in train_all if len(s) >= 2]
    report.skip("training sessions shorter than 2", len(train_all) - len(train))
    protocol = {
        "split": "given files (session-rec prepared)",
        "source_format": "yoochoose",
        "files": prefix,
        "train": "train_full" if use_train_full else "train_tr",
        "valid": "none" if use_train_full else "train_valid",
        "eval_examples": "every prefix of each session",
    }
    return _build(prefix, train, list(parts.get("valid", {}).items()), list(parts["test"].items()), report, protocol)


known_dataset("diginetica-sample", "diginetica", "diginetica-sample")
known_dataset("yoochoose-100k", "yoochoose", "yoochoose-100k")
