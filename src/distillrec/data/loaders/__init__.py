"""Loaders: each turns one on-disk format into the canonical :class:`~distillrec.data.dataset.Dataset`.

A loader is a function ``load(path: Path, **options) -> Dataset`` registered under a format name. Datasets are named
in configs either by a known name (``amazon2018-scientific-text``: format and folder are looked up in
:data:`KNOWN_DATASETS`, the folder under the data root) or by ``format`` + ``path``.
The data root is ``$DISTILLREC_DATA_ROOT`` if set, else the first existing of ``./shared/datasets``,
``../shared/datasets`` (from the working directory and from this checkout).
"""

from __future__ import annotations

import os
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


def load_dataset(cfg: DatasetConfig | dict) -> Dataset:
    if isinstance(cfg, dict):
        cfg = DatasetConfig(**cfg)
    fmt, path, options = resolve(cfg)
    ds = _LOADERS[fmt](path, **options) if path is not None else _LOADERS[fmt](**options)
    ds.name = cfg.name
    if cfg.embeddings:
        from ..embeddings import attach_item_embeddings

        for prefix, folder in cfg.embeddings.items():
            attach_item_embeddings(ds, prefix, folder)
    return ds


def available_formats() -> list[str]:
    return sorted(_LOADERS)


# the built-in loaders register themselves (and their known dataset names) on import
from . import amazon_raw, click_log, microlens, recbole_atomic, s3rec, session_tsv  # noqa: E402,F401
from . import recbole_inter  # noqa: E402,F401
