"""Checks behind ``distillrec data inspect``: statistics plus a list of problems found in a dataset.

- :func:`validate_dataset` -> list of :class:`Problem` (severity "error" or "warning", a code, a count, a message
  with a few examples);
- :func:`inspect_dataset` -> a plain dict (statistics, protocol, load report, problems);
- :func:`inspect_path` loads a folder (format guessed from its files) or a known dataset name and inspects it,
  with loader options (``distillrec data inspect --option key=value``, parsed by :func:`parse_option`);
- :func:`path_dataset_config` / :func:`load_dataset_source`: the dataset a command-line argument names (a name, a
  folder, or a YAML file with a ``dataset:`` block);
- :func:`format_report` renders such a report as plain text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import ConfigError
from .dataset import DataError, Dataset
from .loaders import KNOWN_DATASETS, DatasetConfig, available_formats, load_dataset

_EXAMPLES = 5


@dataclass
class Problem:
    severity: str  # "error" | "warning"
    code: str
    count: int
    message: str
    examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ex = f" (e.g. {', '.join(self.examples)})" if self.examples else ""
        return f"[{self.severity}] {self.code}: {self.count} {self.message}{ex}"


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if arrays else np.zeros(0, np.int64)


def _image_problems(ids: list[str], paths: list[str | None]) -> tuple[list[str], list[str]]:
    """(items whose image file is absent, items whose file is not an image), as 'item: path'. Only the file header
    is read (``PIL.Image.open`` is lazy), so this is fast even for many images."""
    from PIL import Image

    absent, unreadable = [], []
    for ext, path in zip(ids, paths):
        if path is None or str(path).strip() == "":
            continue
        if not Path(path).is_file():
            absent.append(f"{ext}: {path}")
            continue
        try:
            with Image.open(path) as im:
                if im.width < 1 or im.height < 1:
                    raise ValueError("empty image")
        except Exception:  # noqa: BLE001 - whatever PIL raises, the file is not usable as an image
            unreadable.append(f"{ext}: {path}")
    return absent, unreadable


def validate_dataset(ds: Dataset) -> list[Problem]:
    problems: list[Problem] = []
    n = ds.n_items
    items = ds.items

    def add(sev: str, code: str, count: int, msg: str, examples: list[Any] | None = None) -> None:
        if count:
            problems.append(Problem(sev, code, int(count), msg, [str(e) for e in (examples or [])[:_EXAMPLES]]))

    # item table
    seen: dict[str, int] = {}
    dups = []
    for i, e in enumerate(items.ids, 1):
        if e in seen:
            dups.append(f"{e!r} (items {seen[e]} and {i})")
        else:
            seen[e] = i
    add("error", "duplicate_item_ids", len(dups), "external item ids appear more than once in the item table", dups)
    for f, vals in items.text.items():
        if len(vals) != n:
            add("error", "text_length_mismatch", 1, f"text field '{f}' has {len(vals)} entries for {n} items")
    if items.text and all(len(v) == n for v in items.text.values()):
        empty = [items.ids[i] for i in range(n) if not any(str(v[i]).strip() for v in items.text.values())]
        add("warning", "items_without_text", len(empty), f"items have no text in any field {list(items.text)}", empty)
    if items.image_paths is not None and len(items.image_paths) != n:
        add("error", "image_paths_length_mismatch", 1, f"image_paths has {len(items.image_paths)} entries for {n} items")
    elif items.image_paths is not None:
        absent, unreadable = _image_problems(items.ids, items.image_paths)
        add("warning", "image_files_missing", len(absent),
            "items name an image file that does not exist (their image features will be all zeros)", absent)
        add("warning", "image_files_unreadable", len(unreadable),
            "image files are not images PIL can open (their image features will be all zeros)", unreadable)
    for name, mat in items.features.items():
        if mat.ndim != 2 or mat.shape[0] != n + 1:
            add("error", "feature_rows_mismatch", 1,
                f"feature '{name}' has shape {list(mat.shape)}; expected [{n + 1}, d] (n_items + padding row)")
            continue
        bad_rows = np.where(~np.isfinite(mat).all(axis=1))[0]
        add("error", "feature_not_finite", len(bad_rows), f"rows of feature '{name}' hold NaN or inf",
            [f"item {r}" for r in bad_rows])
        zero = np.where(~mat[1:].any(axis=1))[0] + 1
        add("warning", "feature_zero_rows", len(zero), f"items have an all-zero '{name}' row",
            [f"item {r}" for r in zero])

    # sequences
    lengths = np.array([len(s) for s in ds.train], dtype=np.int64)
    users = ds.train_users or [f"#{j}" for j in range(len(ds.train))]
    empty_idx = np.where(lengths == 0)[0]
    add("error", "empty_train_sequences", len(empty_idx), "training sequences are empty",
        [users[j] for j in empty_idx])
    one_idx = np.where(lengths == 1)[0]
    add("warning", "length1_train_sequences", len(one_idx),
        "training sequences have a single item (they give no training example)", [users[j] for j in one_idx])

    def out_of_range(arr: np.ndarray) -> np.ndarray:
        return arr[(arr < 1) | (arr > n)]

    for part, arrays in (("train", ds.train), ("valid histories", ds.valid.histories),
                         ("test histories", ds.test.histories),
                         ("valid targets", [ds.valid.targets]), ("test targets", [ds.test.targets])):
        bad = out_of_range(_concat(list(arrays)))
        add("error", "ids_out_of_range", len(bad),
            f"ids in {part} are outside 1..{n} (not in the item table; 0 is padding)", sorted(set(bad.tolist())))

    counts = np.zeros(n + 1, dtype=np.int64)
    tr = _concat(ds.train)
    tr = tr[(tr >= 1) & (tr <= n)]
    np.add.at(counts, tr, 1)
    for part, ex in (("valid", ds.valid), ("test", ds.test)):
        t = ex.targets[(ex.targets >= 1) & (ex.targets <= n)]
        cold = t[counts[t] == 0]
        add("warning", f"cold_{part}_targets", len(cold),
            f"{part} targets never occur in the training sequences (cold items)",
            [items.ids[i - 1] for i in sorted(set(cold.tolist()))])
        if len(ex) == 0:
            add("warning", f"no_{part}_examples", 1, f"the {part} set is empty")
    never = int((counts[1:] == 0).sum())
    add("warning", "items_not_in_train", never, "items occur in no training sequence",
        [items.ids[i] for i in np.where(counts[1:] == 0)[0][:_EXAMPLES]])
    return problems


def inspect_dataset(ds: Dataset) -> dict[str, Any]:
    problems = validate_dataset(ds)
    stats = ds.statistics()
    lengths = [len(s) for s in ds.train]
    if lengths:
        stats["train_length_min_max"] = [int(min(lengths)), int(max(lengths))]
    return {
        "statistics": stats,
        "protocol": dict(ds.protocol),
        "fingerprint": ds.fingerprint(),
        "load_report": {"skipped": dict(ds.report.skipped), "notes": list(ds.report.notes)},
        "problems": [asdict(p) for p in problems],
        "errors": sum(p.severity == "error" for p in problems),
        "warnings": sum(p.severity == "warning" for p in problems),
    }


def guess_format(folder: Path) -> tuple[str, dict[str, Any]]:
    """The loader format (and options) a folder's files suggest; DataError listing the files when none fits."""
    if folder.is_file():
        name = folder.name
        if name.endswith(("_5.json.gz", "_5.json")):
            return "amazon2018", {"category": name.split("_5.json")[0]}
        if name.endswith(".inter") and not name.endswith((".train.inter", ".valid.inter", ".test.inter")) \
                and "recbole_inter" in available_formats():
            return "recbole_inter", {}
        if ".jsonl" in name:
            return "amazon2023", {"category": name.split(".jsonl")[0].removeprefix("meta_")}
        folder = folder.parent
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    has = lambda pred: [n for n in names if pred(n)]  # noqa: E731
    if has(lambda n: n.endswith(".train.inter")):
        return "recbole_atomic", {}
    plain_inter = has(lambda n: n.endswith(".inter"))
    if plain_inter and "recbole_inter" in available_formats():
        return "recbole_inter", {}
    if has(lambda n: n.endswith("_train.tsv")):
        return "session_tsv", {}
    if has(lambda n: n.endswith("pairs.tsv")):
        return "microlens", {}
    if has(lambda n: n.endswith("_5.json.gz") or n.endswith("_5.json")):
        return "amazon2018", {}
    if has(lambda n: n.endswith((".jsonl.gz", ".jsonl")) and not n.startswith("meta_")):
        return "amazon2023", {}
    if has(lambda n: n.endswith(".txt") and n.endswith(("_train_tr.txt", "_test.txt"))):
        for n in has(lambda n: n.endswith(".txt")):
            with open(folder / n, encoding="utf-8", errors="replace") as f:
                if "SessionId" in f.readline():
                    return "yoochoose", {}
    for n in has(lambda n: n.endswith(".csv")):
        with open(folder / n, encoding="utf-8", errors="replace") as f:
            head = f.readline().lower().replace("_", "")
        if "sessionid;" in head:
            return "diginetica", {"file": n}
    txt = has(lambda n: n.endswith(".txt") and not n.endswith("_textual_id.txt") and n != "SOURCE.txt")
    if txt and (has(lambda n: "item2attributes" in n or n.endswith("_item_meta.tsv")) or len(txt) == 1):
        return "s3rec", {}
    raise DataError(
        f"{folder}: cannot tell the format from the files {names[:10]}; give --format (one of "
        f"{', '.join(available_formats())})"
    )


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value), the value read as a YAML scalar (``0.2``, ``true``, ``null``, text)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--option '{text}': expected key=value (a loader option), e.g. --option stem=Beauty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if value is not None and not isinstance(value, (str, int, float, bool)):
        value = raw  # lists, mappings, dates: keep the text
    return key, value


def path_dataset_config(path: str | Path, fmt: str | None = None, options: dict[str, Any] | None = None
                        ) -> DatasetConfig:
    """The dataset config of a known dataset name, or of a folder/file (format guessed from its files unless given)."""
    options = dict(options or {})
    p = Path(path)
    if str(path) in KNOWN_DATASETS and not p.exists():
        return DatasetConfig(name=str(path), format=fmt, options=options)
    if not p.exists():
        raise DataError(
            f"'{path}' is neither an existing folder nor a known dataset name (known: "
            f"{', '.join(sorted(KNOWN_DATASETS))})"
        )
    guessed: dict[str, Any] = {}
    if fmt is None:
        fmt, guessed = guess_format(p)
    return DatasetConfig(name=p.name if p.is_dir() else p.stem, format=fmt, path=str(p), options=guessed | options)


def load_dataset_source(source: str | Path) -> Dataset:
    """A dataset from what a user names on the command line: a YAML file holding a ``dataset:`` block (a run config,
    a method recipe) or a dataset config itself (``name``, ``format``, ``path``, ``options``, ``embeddings``), a
    dataset folder or file (as ``distillrec data inspect`` reads it), or a known dataset name."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        from pydantic import ValidationError

        from ..config import format_validation_error

        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping with a 'dataset:' block (a run config) or the keys of a "
                              "dataset config (name, format, path, options)")
        block, prefix = (raw["dataset"], "dataset.") if "dataset" in raw else (raw, "")
        if isinstance(block, str):
            block = {"name": block}
        if not isinstance(block, dict):
            raise ConfigError(f"{p}: {prefix or 'the file'} must be a mapping (name, format, path, options)")
        try:
            cfg = DatasetConfig(**block)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, str(p), prefix)) from None
        return load_dataset(cfg)
    return load_dataset(path_dataset_config(source))


def inspect_path(path: str | Path, fmt: str | None = None, *, options: dict[str, Any] | None = None,
                 **more_options: Any) -> dict[str, Any]:
    """Load a known dataset name, or a folder/file (format guessed unless given), and inspect it.

    ``options`` (and any further keyword arguments) are loader options; they are checked against the loader's
    parameters before anything is read (a mistyped name is a DataError that lists the valid ones).
    """
    cfg = path_dataset_config(path, fmt, {**(options or {}), **more_options})
    ds = load_dataset(cfg)
    report = inspect_dataset(ds)
    report["format"] = cfg.format or KNOWN_DATASETS.get(cfg.name, (None,))[0]
    report["path"] = str(path)
    return report


def format_report(report: dict[str, Any]) -> str:
    s = report["statistics"]
    lines = [f"dataset {s['name']}" + (f"  (format {report['format']}, {report['path']})" if "format" in report else "")]
    lines.append(f"  fingerprint        {report.get('fingerprint', '')}")
    for key in ("items", "train_sequences", "train_interactions", "avg_train_length", "train_length_min_max",
                "valid_examples", "test_examples", "density", "text_fields", "features", "images"):
        if key in s:
            lines.append(f"  {key:<18} {s[key]}")
    if report.get("protocol"):
        lines.append("protocol")
        lines += [f"  {k}: {v}" for k, v in report["protocol"].items()]
    lr = report.get("load_report", {})
    if lr.get("skipped") or lr.get("notes"):
        lines.append("load report")
        lines += [f"  skipped {n}: {reason}" for reason, n in sorted(lr.get("skipped", {}).items())]
        lines += [f"  note: {note}" for note in lr.get("notes", [])]
    probs = report.get("problems", [])
    lines.append(f"problems: {report.get('errors', 0)} error(s), {report.get('warnings', 0)} warning(s)")
    for p in probs:
        ex = f" (e.g. {', '.join(p['examples'])})" if p.get("examples") else ""
        lines.append(f"  [{p['severity']}] {p['code']}: {p['count']} {p['message']}{ex}")
    if not probs:
        lines.append("  none")
    return "\n".join(lines)
