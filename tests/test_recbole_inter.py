"""The ``recbole_inter`` loader reproduces RecBole 1.2.1's ml-100k leave-one-out split for every user.

The reference split (``ml100k_loo_split.tsv``) was exported from RecBole itself; ml-100k is read from the copy
shipped inside the recbole wheel (the benchmark venv, or any installed recbole). Skipped when either is missing.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest

from distillrec.data.loaders import load_dataset
from distillrec.data.loaders.recbole_inter import bundled_ml100k, recbole_time_order

ROOT = Path(__file__).resolve().parents[1]


def _find_ml100k() -> Path | None:
    env = os.environ.get("DISTILLREC_ML100K")
    cands = [Path(env)] if env else []
    for pattern in ("benchmarks/_work/recbole-venv/lib/python3*/site-packages/recbole/dataset_example/ml-100k",
                    ".venv*/lib/python3*/site-packages/recbole/dataset_example/ml-100k"):
        cands += [Path(p) for p in sorted(glob.glob(str(ROOT / pattern)))]
    found = bundled_ml100k()
    if found is not None:
        cands.append(found)
    for c in cands:
        if (c / "ml-100k.inter").is_file():
            return c
    return None


def _find_reference() -> Path | None:
    for base in (ROOT, *ROOT.parents):
        p = base / "shared" / "reference" / "recbole-ml100k" / "ml100k_loo_split.tsv"
        if p.is_file():
            return p
    return None


ML100K = _find_ml100k()
REFERENCE = _find_reference()


def test_float32_normalisation_merges_close_timestamps_and_keeps_file_order():
    t = np.array([0.0, 1e9, 1e9 + 1, 1e9])  # 1e9 and 1e9 + 1 are equal once normalised to float32
    key = recbole_time_order(t)
    assert key.dtype == np.float32 and key[1] == key[2] == key[3]
    assert list(np.argsort(key, kind="stable")) == [0, 1, 2, 3]


def test_tiny_file_split(tmp_path):
    f = tmp_path / "toy.inter"
    f.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "a\tx\t5\t30\n" "a\ty\t3\t10\n" "a\tz\t1\t20\n" "a\tw\t1\t20\n"  # z, w tie: file order z then w
        "b\tx\t2\t5\n" "b\ty\t2\t6\n"  # too short for leave-one-out
    )
    ds = load_dataset({"name": "toy", "format": "recbole_inter", "path": str(f)})
    ext = ds.items.ids
    assert [ext[i - 1] for i in ds.train[0]] == ["y", "z"]
    assert ext[ds.valid.targets[0] - 1] == "w" and ext[ds.test.targets[0] - 1] == "x"
    assert len(ds.train) == 1 and ds.report.skipped


@pytest.mark.skipif(ML100K is None, reason="ml-100k not found: needs recbole installed (benchmarks/_work/recbole-venv "
                    "or this Python) or DISTILLREC_ML100K=<folder with ml-100k.inter>")
@pytest.mark.skipif(REFERENCE is None, reason="shared/reference/recbole-ml100k/ml100k_loo_split.tsv not found")
def test_ml100k_split_equals_recbole_for_all_943_users():
    ds = load_dataset({"name": "ml-100k", "path": str(ML100K)})
    ext = ds.items.ids
    ours = {}
    for u, vt, tt, th in zip(ds.valid.users, ds.valid.targets, ds.test.targets, ds.test.histories):
        ours[u] = (ext[vt - 1], ext[tt - 1], [ext[i - 1] for i in th[-50:]], len(th))
    lines = REFERENCE.read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:3] == ["user_id", "valid_item", "test_item"]
    ref = {}
    for line in lines[1:]:
        parts = line.split("\t")
        ref[parts[0]] = (parts[1], parts[2], parts[5].split(), int(parts[4]))
    assert len(ref) == 943 and set(ours) == set(ref)
    bad_valid = [u for u in ref if ours[u][0] != ref[u][0]]
    bad_test = [u for u in ref if ours[u][1] != ref[u][1]]
    bad_hist = [u for u in ref if ours[u][2] != ref[u][2]]
    assert not bad_valid and not bad_test, f"{len(bad_valid)} valid / {len(bad_test)} test targets differ"
    assert not bad_hist, f"{len(bad_hist)} last-50 test histories differ"
    # RecBole's test history length counts at most MAX_ITEM_LIST_LENGTH items
    assert all(min(ours[u][3], 50) == ref[u][3] for u in ref)
    assert ds.n_items == 1682 and sum(len(s) for s in ds.train) + 2 * 943 == 100_000


def test_mistyped_option_and_blank_lines(tmp_path):
    from distillrec.data.dataset import DataError

    f = tmp_path / "toy.inter"
    f.write_text("user_id:token\titem_id:token\ttimestamp:float\n" "a\tx\t1\n\n" "a\ty\t2\n" "a\tz\t3\n")
    with pytest.raises(DataError, match=r"'normalise' is not an option of format 'recbole_inter'; did you mean "
                                        r"'normalize'\? .*stem \(default None\), normalize \(default True\)"):
        load_dataset({"name": "toy", "format": "recbole_inter", "path": str(f), "options": {"normalise": False}})
    ds = load_dataset({"name": "toy", "format": "recbole_inter", "path": str(f), "options": {"normalize": False}})
    assert ds.report.skipped == {"blank lines in toy.inter (ignored)": 1}
    assert [ds.items.ids[i - 1] for i in ds.test.histories[0]] == ["x", "y"]
