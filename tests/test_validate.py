"""The validator behind `distillrec data inspect`, format guessing, and the text report."""

from __future__ import annotations

import numpy as np
import pytest

from distillrec.data.dataset import DataError, Dataset, Examples, ItemTable
from distillrec.data.loaders import data_root
from distillrec.data.validate import format_report, guess_format, inspect_dataset, inspect_path, validate_dataset


def _clean() -> Dataset:
    items = ItemTable(ids=["a", "b", "c"], text={"title": ["A", "B", "C"]})
    items.add_features("f", np.ones((3, 2), np.float32))
    return Dataset("toy", items, [np.array([1, 2]), np.array([2, 3])],
                   Examples([np.array([1, 2])], np.array([3])), Examples([np.array([1, 2, 3])], np.array([1])),
                   train_users=["u1", "u2"])


def _codes(ds):
    return {p.code: p for p in validate_dataset(ds)}


def test_clean_dataset_has_no_problems():
    assert validate_dataset(_clean()) == []
    rep = inspect_dataset(_clean())
    assert rep["errors"] == 0 and rep["statistics"]["items"] == 3
    assert "problems: 0 error(s), 0 warning(s)" in format_report(rep)


def test_every_problem_is_found():
    ds = _clean()
    ds.items.ids[2] = "a"
    ds.items.text["title"][1] = ""
    ds.items.features["f"][2, 0] = np.nan
    ds.items.features["g"] = np.ones((2, 2), np.float32)
    ds.train = [np.array([1, 7]), np.array([2]), np.array([], dtype=np.int64)]
    ds.train_users = ["u1", "u2", "u3"]
    ds.valid = Examples([np.array([1])], np.array([3]))
    ds.test = Examples([np.array([0, 1])], np.array([9]))
    c = _codes(ds)
    assert c["duplicate_item_ids"].severity == "error" and "'a'" in c["duplicate_item_ids"].examples[0]
    assert c["items_without_text"].count == 1 and c["items_without_text"].examples == ["b"]
    assert c["feature_not_finite"].count == 1 and c["feature_rows_mismatch"].severity == "error"
    assert c["empty_train_sequences"].examples == ["u3"]
    assert c["length1_train_sequences"].examples == ["u2"]
    oor = [p for p in validate_dataset(ds) if p.code == "ids_out_of_range"]
    assert sum(p.count for p in oor) == 3  # 7 in train, 0 in a test history, 9 as test target
    assert c["cold_valid_targets"].severity == "warning" and c["cold_valid_targets"].count == 1
    text = format_report(inspect_dataset(ds))
    assert "[error] duplicate_item_ids" in text and "[warning] cold_valid_targets" in text


def test_guess_format(tmp_path):
    cases = {
        "a": ["X.train.inter"], "b": ["p_train.tsv"], "c": ["ML_pairs.tsv"], "d": ["Cat_5.json.gz"],
        "e": ["Cat.jsonl.gz", "meta_Cat.jsonl.gz"], "f": ["Beauty.txt", "Beauty_item2attributes.json"],
    }
    expected = {"a": "recbole_atomic", "b": "session_tsv", "c": "microlens", "d": "amazon2018",
                "e": "amazon2023", "f": "s3rec"}
    for key, files in cases.items():
        (tmp_path / key).mkdir()
        for f in files:
            (tmp_path / key / f).write_text("x\n")
        assert guess_format(tmp_path / key)[0] == expected[key]
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "log.csv").write_text("session_id;user_id;item_id;timeframe;eventdate\n")
    assert guess_format(tmp_path / "g") == ("diginetica", {"file": "log.csv"})
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "y_test.txt").write_text("SessionId\tItemId\tTime\n")
    assert guess_format(tmp_path / "h")[0] == "yoochoose"
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "notes.md").write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        guess_format(tmp_path / "i")
    assert guess_format(tmp_path / "d" / "Cat_5.json.gz") == ("amazon2018", {"category": "Cat"})
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "ml.inter").write_text("user_id:token\titem_id:token\n")
    assert guess_format(tmp_path / "j")[0] == "recbole_inter"


def test_inspect_path_fixture_and_errors(tmp_path):
    (tmp_path / "Toy.txt").write_text("1 1 2 3\n2 2 3 1 2\n")
    rep = inspect_path(tmp_path)
    assert rep["format"] == "s3rec" and rep["statistics"]["train_sequences"] == 2
    assert "dataset" in format_report(rep)
    with pytest.raises(DataError, match="neither an existing folder nor a known dataset name"):
        inspect_path("no-such-dataset-anywhere")


def test_inspect_real_known_name():
    root = data_root()
    if root is None or not (root / "amazon2018-scientific-mm").is_dir():
        pytest.skip(f"amazon2018-scientific-mm not found under the data root ({root})")
    rep = inspect_path("amazon2018-scientific-mm")
    assert rep["errors"] == 0
    assert rep["statistics"]["features"] == {"text_clip": [1586, 512], "image_clip": [1586, 512]}
    assert "text_clip" in format_report(rep)
