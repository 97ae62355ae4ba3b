"""Loaders: each turns one on-disk format into the canonical :class:`~distillrec.data.dataset.Dataset`.

A loader is a function ``load(path: Path, **options) -> Dataset`` registered under a format name. Datasets are named
in configs either by a known name (``amazon2018-scientific-text``: format and folder are looked up in
:data:`KNOWN_DATASETS`, the folder under the data root) or by ``format`` + ``path``.
The data root is ``$DISTILLREC_DATA_ROOT`` if set, else the first existing of ``./shared/datasets``,
``../shared/datasets`` (from the working directory and from this checkout).

A loader's options are its keyword parameters; :func:`validate_loader_options` checks names and value types against
them (a config layer calls it when the config is read; :func:`load_dataset` calls it too). The row, file and id
helpers every loader shares live in :mod:`._io`.
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..dataset import DataError, Dataset

_LOADERS: dict[str, Callable[..., Dataset]] = {}


def register_loader(fmt: str):
    def wrap(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        _LOADERS[fmt] = fn
        return fn

    return wrap


# known name -> (format, folder under the data root or None, default options)
KNOWN_DATASETS: dict[str, tuple[str, str | None, dict[str, Any]]] = {}


def known_dataset(name: str, fmt: str, folder: str | None, **options: Any) -> None:
    KNOWN_DATASETS[name] = (fmt, folder, options)


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    format: str | None = None
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    # precomputed item embeddings to attach as features: prefix -> folder written by `distillrec embed`
    # (features "<prefix>_image", "<prefix>_text"; rows matched by external item id)
    embeddings: dict[str, str] = Field(default_factory=dict)
    # the text fields the bundled text encoder reads when a model names `text_minilm` (null: every text field,
    # joined by ". "); TPAD names its own (`text_fields`), and a run on the same features names the same ones
    encoder_text_fields: list[str] | None = None


def data_root() -> Path | None:
    env = os.environ.get("DISTILLREC_DATA_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for cand in (Path.cwd() / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets",
                 *(p.parent / "shared" / "datasets" for p in here.parents)):
        if cand.is_dir():
            return cand
    return None


def resolve(cfg: DatasetConfig) -> tuple[str, Path | None, dict[str, Any]]:
    """(format, path, options) for a dataset config; raises DataError with the fix when it cannot."""
    fmt, path, options = cfg.format, Path(cfg.path) if cfg.path else None, dict(cfg.options)
    if cfg.name in KNOWN_DATASETS:
        kfmt, folder, kopts = KNOWN_DATASETS[cfg.name]
        fmt = fmt or kfmt
        options = kopts | options
        if path is None and folder is not None:
            root = data_root()
            if root is None or not (root / folder).is_dir():
                raise DataError(
                    f"dataset '{cfg.name}': folder '{folder}' not found under the data root "
                    f"({root or 'none found'}); set DISTILLREC_DATA_ROOT to the folder that holds '{folder}', "
                    "or give dataset.path"
                )
            path = root / folder
    if fmt is None:
        raise DataError(
            f"dataset '{cfg.name}' is not a known name and has no 'format'; known names: "
            f"{', '.join(sorted(KNOWN_DATASETS))}; formats: {', '.join(sorted(_LOADERS))}"
        )
    if fmt not in _LOADERS:
        raise DataError(f"dataset '{cfg.name}': unknown format '{fmt}'; formats: {', '.join(sorted(_LOADERS))}")
    if path is not None and not path.exists():
        raise DataError(f"dataset '{cfg.name}': path '{path}' does not exist")
    return fmt, path, options


def loader_options(fmt: str) -> dict[str, inspect.Parameter]:
    """The options of format ``fmt``'s loader: its keyword parameters (the path excepted), in signature order."""
    params = list(inspect.signature(_LOADERS[fmt]).parameters.values())
    return {p.name: p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _loader_format(fmt_or_name: str) -> str:
    if fmt_or_name in _LOADERS:
        return fmt_or_name
    if fmt_or_name in KNOWN_DATASETS:
        return KNOWN_DATASETS[fmt_or_name][0]
    raise DataError(
        f"dataset '{fmt_or_name}' is not a known name or format; known names: {', '.join(sorted(KNOWN_DATASETS))}; "
        f"formats: {', '.join(sorted(_LOADERS))}"
    )


_TYPE_WORDS = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "text",
               Path: "a path"}


def _type_parts(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [x for a in typing.get_args(tp) for x in _type_parts(a)]
    return [tp]


def _accepts(tp: Any, value: Any) -> bool:
    if tp is Any or tp not in _TYPE_WORDS:
        return True  # not checked
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, (str, Path))  # Path


def _check_options(fmt_or_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the loader's parameters; numbers given for text-only options become text."""
    fmt = _loader_format(fmt_or_name)
    params = loader_options(fmt)
    fn = _LOADERS[fmt]
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: names are still checked
        hints = {}
    valid = ", ".join(f"{n} (default {p.default!r})" for n, p in params.items()) or "none"
    # a loader taking **options checks their names itself (e.g. "demo")
    open_ended = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    out = dict(options)
    for key, value in options.items():
        if key not in params and open_ended and key != "path":
            continue
        if key not in params:
            if key == "path":
                raise DataError(f"dataset option 'path': give the path as dataset.path, not among the options of "
                                f"format '{fmt}'; its options: {valid}")
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise DataError(f"dataset option '{key}' is not an option of format '{fmt}'; {hint}"
                            f"the options of '{fmt}' are: {valid}")
        if key not in hints:
            continue
        parts = _type_parts(hints[key])
        if any(_accepts(t, value) for t in parts):
            continue
        if str in parts and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = str(value)  # e.g. stem: 2014 read from YAML as a number
            continue
        words = " or ".join(dict.fromkeys(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in parts))
        raise DataError(f"dataset option {key}={value!r} of format '{fmt}': expected {words} "
                        f"(default {params[key].default!r})")
    return out


def validate_loader_options(fmt_or_name: str, options: dict[str, Any]) -> None:
    """Check a dataset's loader options before anything is loaded or computed.

    ``fmt_or_name`` is a format (``s3rec``) or a known dataset name (``amazon2014-beauty``). Raises a
    :class:`DataError` that names an unknown option (with the closest valid name) and lists the valid ones with
    their defaults, or names an option whose value has the wrong type and says which type it needs.
    """
    _check_options(fmt_or_name, options)


def load_dataset(cfg: DatasetConfig | dict) -> Dataset:
    if isinstance(cfg, dict):
        cfg = DatasetConfig(**cfg)
    fmt, path, options = resolve(cfg)
    options = _check_options(fmt, options)
    ds = _LOADERS[fmt](path, **options) if path is not None else _LOADERS[fmt](**options)
    ds.name = cfg.name
    _check_not_empty(ds, fmt, path)
    if cfg.embeddings:
        from ..embeddings import attach_item_embeddings

        for prefix, folder in cfg.embeddings.items():
            attach_item_embeddings(ds, prefix, folder)
    return ds


def _check_not_empty(ds: Dataset, fmt: str, path: Path | None) -> None:
    """A dataset that leaves no training sequence is an error when it is loaded (not a KeyError at the end of
    training), naming the data and what the loader skipped. (No validation or test rows is a warning of
    ``distillrec data inspect``; ``distillrec train`` refuses it before the run folder is made.)"""
    if ds.train:
        return
    where = f"{path} ({fmt})" if path is not None else f"'{ds.name}' ({fmt})"
    raise DataError(f"{where}: the data leaves no training sequence after loading ({len(ds.valid)} validation and "
                    f"{len(ds.test)} test rows; load report: {ds.report.summary()}); give more interactions per user "
                    "or session (leave-one-out formats need 3 per user)")


def available_formats() -> list[str]:
    return sorted(_LOADERS)


# the built-in loaders register themselves (and their known dataset names) on import
from . import amazon_raw, click_log, microlens, recbole_atomic, s3rec, session_tsv  # noqa: E402,F401
from . import recbole_inter  # noqa: E402,F401
