"""Attach precomputed item embeddings (the output folder of ``distillrec embed``) to a dataset's item table.

A folder holds ``item_embeddings.safetensors`` (one float32 matrix per name, e.g. ``image`` and ``text``, row 0 =
padding, row i = item i of the table it was made from) and ``item_ids.json`` (position i = external id of item i).
Rows are matched to this dataset's items by **external id**, not by position, so a folder made from the same raw
data loaded in another item order still lines up; every item of the dataset must have a row, or the error names the
missing ids and the fix. Each matrix becomes the feature ``<prefix>_<name>`` (e.g. ``tpad_image``, ``tpad_text``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset

EMBEDDINGS_FILE = "item_embeddings.safetensors"
IDS_FILE = "item_ids.json"


def attach_item_embeddings(ds: Dataset, prefix: str, folder: str | Path) -> list[str]:
    """Add every matrix of ``folder`` as feature ``<prefix>_<name>``; returns the feature names added."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    path, ids_path = folder / EMBEDDINGS_FILE, folder / IDS_FILE
    if not path.is_file() or not ids_path.is_file():
        raise DataError(f"dataset.embeddings.{prefix}: '{folder}' holds no {EMBEDDINGS_FILE} + {IDS_FILE}; "
                        "run `distillrec embed` (or `distillrec tpad`) first, or fix the path")
    tensors = load_file(str(path))
    ids = json.loads(ids_path.read_text())
    row_of = {str(e): i for i, e in enumerate(ids) if e is not None}
    missing = [e for e in ds.items.ids if e not in row_of]
    if missing:
        raise DataError(f"{ids_path}: {len(missing)} of the dataset's {ds.n_items} items have no embedding row "
                        f"(e.g. {missing[:3]}); embed this dataset's items (same loader options) and retry")
    order = np.array([row_of[e] for e in ds.items.ids], dtype=np.int64)
    added = []
    for name, m in sorted(tensors.items()):
        if m.ndim != 2 or m.shape[0] != len(ids):
            raise DataError(f"{path}: tensor '{name}' has shape {m.shape}; expected [{len(ids)}, d]")
        ds.items.add_features(f"{prefix}_{name}", m[order].astype(np.float32), source=str(path))
        added.append(f"{prefix}_{name}")
    return added
