"""The one user-error contract: every command answers a bad config, a bad path and a misspelt feature (and the other
mistakes new users made) with exit code 2 and one line that names the problem -- no traceback, no run folder left
behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distillrec.cli import app

from conftest import TINY_DEMO

runner = CliRunner()
SHOP = {"name": "demo", "options": {"n_items": 60, "n_users": 40, "seed": 1, "write_images": False}}


def _fails(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    out = result.output
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for n in needles:
        assert n in out, (n, out)
    return out


def _yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _train_cfg(tmp_path, **train):
    return _yaml(tmp_path / "t.yaml", {"model": {"name": "sasrec"}, "dataset": TINY_DEMO,
                                       "train": {"epochs": 1, "progress": False, **train}})


# --------------------------------------------------------------------------------------------- every command
def test_every_command_names_a_missing_config_or_folder(tmp_path):
    nowhere = tmp_path / "nowhere.yaml"
    for cmd in (["train"], ["embed"], ["align"], ["tpad"], ["method", "tpad"], ["method", "align"]):
        _fails([*cmd, nowhere], "nowhere.yaml", "not found")
    for cmd in (["evaluate", tmp_path / "norun"], ["recommend", tmp_path / "norun", "x"],
                ["compare", tmp_path / "norun"]):
        _fails(cmd, "norun")
    _fails(["data", "inspect", tmp_path / "nodata"], "nodata")
    _fails(["data", "export-recbole", "no-such-dataset", "--out", tmp_path / "x"], "no-such-dataset")
    _fails(["method", "nosuch", nowhere], "unknown method 'nosuch'", "tpad")


def test_every_config_command_names_a_misspelt_key(tmp_path):
    _fails(["train", _yaml(tmp_path / "a.yaml", {"model": {"name": "pop"}, "dataset": TINY_DEMO, "trian": {}})],
           "unknown key 'trian'")
    _fails(["embed", _yaml(tmp_path / "b.yaml", {"dataset": SHOP, "lm": {"name": "tiny"}, "batchsize": 2})],
           "unknown key 'batchsize'")
    _fails(["tpad", _yaml(tmp_path / "c.yaml", {"dataset": SHOP, "knowlege": {}})], "unknown key 'knowlege'")
    _fails(["align", _yaml(tmp_path / "d.yaml", {"dataset": SHOP, "epocs": 1})], "unknown key 'epocs'")


def test_a_misspelt_multimodal_key_is_found_when_the_config_is_read(tmp_path):
    for cmd in ("tpad", "align"):
        _fails([cmd, _yaml(tmp_path / f"{cmd}.yaml", {"dataset": SHOP, "lm": "tiny",
                                                       "multimodal": {"conector": "mlp"}}), "--out", tmp_path / cmd],
               "conector")
        assert not (tmp_path / cmd).exists()


def test_every_command_names_a_misspelt_feature(tmp_path):
    pytest.importorskip("transformers")
    base = {"dataset": SHOP, "lm": {"name": "tiny"}, "progress": False}
    _fails(["train", _yaml(tmp_path / "t.yaml", {"model": {"name": "fused_sasrec",
                                                          "params": {"features": ["atributes_onehot"]}},
                                                "dataset": SHOP, "train": {"epochs": 1}}), "--out", tmp_path / "r"],
           "atributes_onehot", "attributes_onehot")
    assert not (tmp_path / "r").exists()  # found before the run folder is made
    _fails(["embed", _yaml(tmp_path / "e.yaml", {**base, "image_features": "image_clipp"}), "--out", tmp_path / "e"],
           "image_clipp", "attributes_onehot")
    _fails(["tpad", _yaml(tmp_path / "p.yaml", {**base, "image_features": "image_clipp"}), "--out", tmp_path / "p"],
           "image_clipp", "attributes_onehot")
    _fails(["align", _yaml(tmp_path / "a.yaml", {**base, "image_feature": "image_clipp"}), "--out", tmp_path / "a"],
           "image_clipp", "attributes_onehot")


# ---------------------------------------------------------------------------------------- values and options
@pytest.mark.parametrize("override,needle", [
    ("train.max_len=0", "train.max_len"),
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=-1", "train.batch_size"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=-0.1", "train.lr"),
    ("train.num_threads=0", "train.num_threads"),
    ("train.seeds=[]", "train.seeds"),
    ("train.seeds=[1,", "not valid YAML"),
    ("train.max_len=80", "max_len=50"),  # longer than SASRec's positional table
    ("model.params.hidden_sise=8", "hidden_sise"),
    ("model.params.hidden_size=-1", "model.params.hidden_size"),  # was a traceback from torch
    ("model.params.n_heads=0", "model.params.n_heads"),
    ("model.params.n_heads=3", "not a multiple of n_heads 3"),
    ("model.params.hidden_dropout_prob=1.5", "model.params.hidden_dropout_prob"),
])
def test_train_rejects_bad_values_before_anything_runs(tmp_path, override, needle):
    _fails(["train", _train_cfg(tmp_path), "--set", override, "--out", tmp_path / "r"], needle)
    assert not (tmp_path / "r").exists()


def test_a_mistyped_loader_option_names_it_and_leaves_no_run_folder(tmp_path):
    cfg = _yaml(tmp_path / "c.yaml", {"model": {"name": "pop"},
                                      "dataset": {"name": "x", "format": "s3rec", "path": str(tmp_path),
                                                  "options": {"stemm": "Beauty"}}})
    _fails(["train", cfg, "--out", tmp_path / "run"], "stemm")
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_utf8_or_a_folder(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model: {name: pop}\n# caf\xe9\n".encode("latin-1"))
    _fails(["train", bad], "not UTF-8")
    _fails(["train", tmp_path], "not found")


def test_out_that_is_a_file_and_bad_recommend_and_compare_options(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _fails(["train", _train_cfg(tmp_path), "--out", f], "is a file")
    _fails(["train", _train_cfg(tmp_path), "--out", f / "sub"], "cannot create the folder", "writable --out")
    _fails(["recommend", tmp_path, "a", "-k", "-5"], "-k -5")
    _fails(["recommend", tmp_path, "a", "-k", "0"], "-k 0")
    runner.invoke(app, ["train", _yaml(tmp_path / "p.yaml", {"model": {"name": "pop"}, "dataset": TINY_DEMO}),
                        "--out", tmp_path / "pop"])
    _fails(["compare", tmp_path / "pop", "--metric", "foo@7"], "foo@7", "ndcg@K")


def test_export_recbole_never_writes_outside_out(tmp_path):
    from distillrec.data.export import export_recbole
    from distillrec.data.loaders import load_dataset
    from distillrec.errors import DataError

    ds = load_dataset(TINY_DEMO)
    with pytest.raises(DataError, match="plain name"):
        export_recbole(ds, tmp_path / "out", name="../escaped")
    assert not (tmp_path / "escaped.inter").exists() and not (tmp_path / "out").exists()
    assert export_recbole(ds, tmp_path / "out", name="shop")["inter"] == str(tmp_path / "out" / "shop.inter")


def test_compare_on_validation_and_a_bad_split(tmp_path):
    cfg = _yaml(tmp_path / "p.yaml", {"model": {"name": "pop"}, "dataset": TINY_DEMO})
    assert runner.invoke(app, ["train", cfg, "--out", str(tmp_path / "pop")]).exit_code == 0
    r = runner.invoke(app, ["compare", str(tmp_path / "pop"), "--split", "valid"])
    assert r.exit_code == 0 and "valid ndcg@10" in r.output
    _fails(["compare", tmp_path / "pop", "--split", "train"], "--split 'train'")


def test_gru4rec_sizes_are_checked_when_the_config_is_read(tmp_path):
    cfg = _yaml(tmp_path / "g.yaml", {"model": {"name": "gru4rec", "params": {"hidden_size": -1}}, "dataset": TINY_DEMO})
    _fails(["train", cfg, "--out", tmp_path / "r"], "model.params.hidden_size", "greater than or equal to 1")
    assert not (tmp_path / "r").exists()


def test_export_recbole_command_refuses_a_name_with_a_path(tmp_path):
    out = tmp_path / "deep" / "out"
    _fails(["data", "export-recbole", "../escaped", "--format", "demo", "--out", out], "../escaped", "plain name")
    _fails(["data", "export-recbole", "a/b", "--format", "demo", "--out", out], "a/b", "plain name")
    assert not (tmp_path / "deep").exists()


# ------------------------------------------------------------------------------------------------- data files
def test_a_dataset_that_leaves_no_sequences_is_an_error_when_loaded(tmp_path):
    inter = tmp_path / "inter"
    inter.mkdir()
    (inter / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t10\t1\n1\t11\t2\n2\t10\t3\n")
    s3 = tmp_path / "s3"
    s3.mkdir()
    (s3 / "S.txt").write_text("1 1 2\n2 2\n")
    for folder, fmt in ((inter, "recbole_inter"), (s3, "s3rec")):
        _fails(["data", "inspect", folder, "--format", fmt], str(folder), "no training sequence",
               "users with fewer than 3 interactions")
        cfg = _yaml(tmp_path / f"{fmt}.yaml", {"model": {"name": "gru4rec"},
                                                "dataset": {"name": "x", "format": fmt, "path": str(folder)},
                                                "train": {"epochs": 1, "progress": False}})
        _fails(["train", cfg, "--out", tmp_path / f"run-{fmt}"], "no training sequence")
        assert not (tmp_path / f"run-{fmt}").exists()


def test_extra_columns_in_session_and_atomic_files_name_the_line_and_the_columns(tmp_path):
    sess = tmp_path / "sess"
    sess.mkdir()
    (sess / "a_train.tsv").write_text("session_prefix\ttarget\n1 2\t3\n2 3\t4\textra\n")
    (sess / "a_test.tsv").write_text("session_prefix\ttarget\n1 2\t3\n")
    _fails(["data", "inspect", sess, "--format", "session_tsv"], "a_train.tsv, line 3", "3 tab-separated fields",
           "session_prefix, target")
    atomic = tmp_path / "atomic"
    atomic.mkdir()
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (atomic / "S.train.inter").write_text(head + "0\t0\t1\n")
    (atomic / "S.valid.inter").write_text(head + "0\t0 1\t2\t1700000000\n")
    (atomic / "S.test.inter").write_text(head + "0\t0 1 2\t3\n")
    _fails(["data", "inspect", atomic, "--format", "recbole_atomic"], "S.valid.inter, line 2",
           "user_id:token, item_id_list:token_seq, item_id:token")
    inter = tmp_path / "inter"
    inter.mkdir()
    (inter / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                   + "".join(f"1\t{i}\t{i}\n" for i in range(4)) + "2\t1\t5\t9\n")
    _fails(["data", "inspect", inter, "--format", "recbole_inter"], "x.inter, line 6", "4 tab-separated fields",
           "user_id:token, item_id:token, timestamp:float")


def test_columns_the_header_names_but_the_loader_does_not_use_are_in_the_load_report(tmp_path):
    from distillrec.data.loaders import load_dataset

    inter = tmp_path / "inter"
    inter.mkdir()
    (inter / "x.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                   + "".join(f"1\t{i}\t5\t{i}\n" for i in range(4)))
    ds = load_dataset({"name": "x", "format": "recbole_inter", "path": str(inter)})
    assert "x.inter: column(s) ['rating'] are not used" in ds.report.summary()


def test_files_that_are_not_images_are_warned_about_in_inspect_train_log_and_report(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    import json

    from distillrec.data.loaders import load_dataset

    monkeypatch.setenv("DISTILLREC_CACHE_DIR", str(tmp_path / "cache"))
    shop = {"name": "demo", "options": {"n_items": 30, "n_users": 40, "seed": 1, "out_dir": str(tmp_path / "shop")}}
    paths = load_dataset(shop).items.image_paths
    for p in paths:  # every image file replaced by text: the encoder has nothing to run on
        Path(p).write_text("not an image")
    r = runner.invoke(app, ["data", "inspect", "demo", *(a for k, v in shop["options"].items()
                                                         for a in ("--option", f"{k}={v}"))])
    assert "image_files_unreadable: 30" in r.output
    cfg = _yaml(tmp_path / "f.yaml", {"model": {"name": "fused_sasrec", "params": {"features": ["image_effnet_lite0"]}},
                                      "dataset": shop, "train": {"epochs": 1, "progress": False}})
    r = runner.invoke(app, ["train", cfg, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    needle = "feature 'image_effnet_lite0': 30 of 30 items have an all-zero row"
    assert needle in (tmp_path / "run" / "train.log").read_text()
    assert "30 corrupt" in (tmp_path / "run" / "train.log").read_text()  # the encoder's own count
    assert needle in (tmp_path / "run" / "report.md").read_text()
    assert any(needle in w for w in json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"])
