"""Export a dataset as RecBole atomic files.

``<name>.inter`` (``user_id:token  item_id:token  timestamp:float``) holds one full sequence per user: the training
sequence followed by the valid and the test target, so RecBole's leave-one-out ``valid_and_test`` ordering split
(``eval_args: {split: {LS: valid_and_test}, order: TO}``) reproduces our split for leave-one-out data. Timestamps are
the positions 0, 1, 2, ... of each sequence (ties can't reorder anything). ``<name>.item`` holds ``item_id:token``
and each text field as ``<field>:token_seq``.

Datasets whose valid/test rows are not one-per-training-user continuations (session splits) are exported as: each
training sequence as one "user", then each maximal valid and test session as its own user (ids ``valid-*``,
``test-*``); RecBole's own split then differs from ours, which the returned dict says (``"mode": "sessions"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .dataset import DataError, Dataset, Examples


def _clean(s: str) -> str:
    return " ".join(str(s).replace("\t", " ").split())


def _leave_one_out_rows(ds: Dataset) -> list[tuple[str, np.ndarray]] | None:
    """Per user train + [valid target, test target] when the dataset is a per-user leave-one-out split."""
    if ds.train_users is None or ds.valid.users is None or ds.test.users is None:
        return None
    if not (len(ds.train) == len(ds.valid) == len(ds.test)):
        return None
    vpos = {u: j for j, u in enumerate(ds.valid.users)}
    tpos = {u: j for j, u in enumerate(ds.test.users)}
    if len(vpos) != len(ds.valid) or len(tpos) != len(ds.test):
        return None
    rows = []
    for u, seq in zip(ds.train_users, ds.train):
        if u not in vpos or u not in tpos:
            return None
        v, t = vpos[u], tpos[u]
        vt = int(ds.valid.targets[v])
        if not np.array_equal(ds.valid.histories[v], seq) or not np.array_equal(
                ds.test.histories[t], np.append(seq, vt)):
            return None
        rows.append((u, np.append(seq, [vt, int(ds.test.targets[t])]).astype(np.int64)))
    return rows


def _maximal_sessions(ex: Examples, label: str) -> list[tuple[str, np.ndarray]]:
    fulls = [tuple(np.append(h, t).tolist()) for h, t in zip(ex.histories, ex.targets)]
    proper = {f[:k] for f in set(fulls) for k in range(1, len(f))}
    return [(f"{label}-{j}", np.asarray(f, dtype=np.int64)) for j, f in enumerate(fulls) if f not in proper]


def export_recbole(ds: Dataset, out_dir: str | Path, name: str | None = None) -> dict[str, Any]:
    out = Path(out_dir)
    name = name or ds.name
    if not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"export-recbole: the dataset name '{name}' is used as the file name inside --out and must "
                        "not hold a path ('/', '..'); give a plain name")
    out.mkdir(parents=True, exist_ok=True)
    rows = _leave_one_out_rows(ds)
    mode = "leave_one_out"
    if rows is None:
        mode = "sessions"
        users = ds.train_users or [f"train-{j}" for j in range(len(ds.train))]
        rows = list(zip(users, ds.train)) + _maximal_sessions(ds.valid, "valid") + _maximal_sessions(ds.test, "test")
    ids = [_clean(e) for e in ds.items.ids]
    inter = out / f"{name}.inter"
    with open(inter, "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, seq in rows:
            u = _clean(u)
            for pos, i in enumerate(seq):
                f.write(f"{u}\t{ids[int(i) - 1]}\t{pos}\n")
    item = out / f"{name}.item"
    fields = list(ds.items.text)
    with open(item, "w", encoding="utf-8") as f:
        f.write("\t".join(["item_id:token"] + [f"{fld}:token_seq" for fld in fields]) + "\n")
        for j, e in enumerate(ids):
            f.write("\t".join([e] + [_clean(ds.items.text[fld][j]) for fld in fields]) + "\n")
    return {"inter": str(inter), "item": str(item), "mode": mode, "users": len(rows),
            "interactions": int(sum(len(s) for _, s in rows)),
            "recbole_eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO"} if mode == "leave_one_out"
            else "RecBole's split differs from this dataset's session split"}


def read_recbole_inter(path: str | Path) -> dict[str, list[str]]:
    """user -> item tokens in timestamp order (for checks and round trips)."""
    seqs: dict[str, list[tuple[float, int, str]]] = {}
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        cu, ci, ct = (header.index(h) for h in ("user_id:token", "item_id:token", "timestamp:float"))
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            seqs.setdefault(parts[cu], []).append((float(parts[ct]), n, parts[ci]))
    return {u: [i for _, _, i in sorted(v)] for u, v in seqs.items()}
