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


# ------------------------------------------------------------------------------------------------ loader options

def _sessions(folder):
    folder.mkdir(exist_ok=True)
    (folder / "s_train.tsv").write_text("session_prefix\ttarget\n1\t2\n3 4\t5\n6\t7\n8 9\t1\n")
    (folder / "s_test.tsv").write_text("session_prefix\ttarget\n1\t2\n")
    return folder


def test_parse_option_reads_yaml_scalars():
    from distillrec.data.validate import parse_option
    from distillrec.errors import ConfigError

    assert parse_option("valid_fraction=0.5") == ("valid_fraction", 0.5)
    assert parse_option("augmented=false") == ("augmented", False)
    assert parse_option(" stem = Beauty") == ("stem", "Beauty")
    assert parse_option("stem='2014'") == ("stem", "2014")
    assert parse_option("valid_days=") == ("valid_days", None)
    assert parse_option("meta=a=b.tsv") == ("meta", "a=b.tsv")
    assert parse_option("file=[1, 2]") == ("file", "[1, 2]")
    with pytest.raises(ConfigError, match=r"--option 'stem': expected key=value"):
        parse_option("stem")


def test_inspect_path_passes_loader_options(tmp_path):
    folder = _sessions(tmp_path / "s")
    assert inspect_path(folder)["statistics"]["valid_examples"] == 0  # 10% of 4 sessions rounds to 0
    assert inspect_path(folder, options={"valid_fraction": 0.5})["statistics"]["valid_examples"] == 2
    with pytest.raises(DataError, match=r"'valid_fractoin'.*did you mean 'valid_fraction'"):
        inspect_path(folder, options={"valid_fractoin": 0.5})


def test_cli_inspect_option(tmp_path):
    from typer.testing import CliRunner

    from distillrec.cli import app

    runner = CliRunner()
    folder = _sessions(tmp_path / "s")
    res = runner.invoke(app, ["data", "inspect", str(folder), "--option", "valid_fraction=0.5",
                              "--option", "augmented=false"])
    assert res.exit_code == 0, res.output
    assert any(ln.split() == ["valid_examples", "2"] for ln in res.output.splitlines())
    bad = runner.invoke(app, ["data", "inspect", str(folder), "--option", "prefx=s"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "'prefx'" in bad.output and "did you mean 'prefix'" in bad.output
    assert "valid_fraction (default 0.1)" in bad.output
    noval = runner.invoke(app, ["data", "inspect", str(folder), "--option", "prefix"])
    assert noval.exit_code == 2 and "expected key=value" in noval.output
    # S3-Rec: the item2attributes file is read unless the option turns it off
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "Toy.txt").write_text("1 1 2 3\n2 2 3 1 2\n")
    (tmp_path / "t" / "Toy_item2attributes.json").write_text('{"1": [1], "2": [1, 2], "3": [2]}')
    on = runner.invoke(app, ["data", "inspect", str(tmp_path / "t")])
    assert on.exit_code == 0 and "'attributes_onehot': [4, 2]" in on.output, on.output
    off = runner.invoke(app, ["data", "inspect", str(tmp_path / "t"), "--option", "item2attributes=false"])
    assert off.exit_code == 0 and "attributes_onehot" not in off.output
