"""The command line: clear errors for user mistakes, the run folder contract, quickstart on a small shop."""

import json

import yaml
from typer.testing import CliRunner

from distillrec.cli import app

from conftest import TINY_DEMO

runner = CliRunner()


def test_train_reports_a_mistyped_key_without_a_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "sasrec"}, "dataset": TINY_DEMO, "train": {"epohcs": 2}}))
    result = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "unknown key 'train.epohcs'" in result.output
    assert "Traceback" not in result.output


def test_train_reports_a_missing_dataset_folder(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "pop"}, "dataset": {"name": "x", "format": "s3rec",
                                                                         "path": str(tmp_path / "nowhere")}}))
    result = runner.invoke(app, ["train", str(cfg)])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_train_then_evaluate_then_compare(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "gru4rec"}, "dataset": TINY_DEMO,
                                   "train": {"epochs": 2, "batch_size": 64, "progress": False}}))
    pop = tmp_path / "pop.yaml"
    pop.write_text(yaml.safe_dump({"model": {"name": "pop"}, "dataset": TINY_DEMO}))
    assert runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "gru")]).exit_code == 0
    assert runner.invoke(app, ["train", str(pop), "--out", str(tmp_path / "pop")]).exit_code == 0
    saved = json.loads((tmp_path / "gru" / "metrics.json").read_text())
    result = runner.invoke(app, ["evaluate", str(tmp_path / "gru")])
    assert result.exit_code == 0 and f"{saved['test']['ndcg@10']:.6f}"[:6] in result.output
    result = runner.invoke(app, ["compare", str(tmp_path / "pop"), str(tmp_path / "gru")])
    assert result.exit_code == 0 and "Wilcoxon" in result.output and "gru4rec" in result.output


def test_models_lists_the_baselines():
    result = runner.invoke(app, ["models"])
    for name in ("pop", "sknn", "gru4rec", "sasrec", "srgnn", "fused_sasrec", "fused_gru4rec"):
        assert name in result.output


def test_data_inspect_names_the_file_and_line_of_a_bad_row(tmp_path):
    folder = tmp_path / "Toy"
    folder.mkdir()
    (folder / "Toy.txt").write_text("1 1 2 3\n2 2 x 1\n")
    result = runner.invoke(app, ["data", "inspect", str(folder), "--format", "s3rec"])
    assert result.exit_code == 2
    assert "Toy.txt" in result.output and "line 2" in result.output
    assert "Traceback" not in result.output


def test_data_inspect_warns_about_single_item_sequences(tmp_path):
    folder = tmp_path / "Toy"
    folder.mkdir()
    (folder / "Toy.txt").write_text("1 1 2 3\n2 2 3 1\n3 1 3 2 4\n")
    result = runner.invoke(app, ["data", "inspect", str(folder), "--format", "s3rec"])
    assert result.exit_code == 0
    assert "length1_train_sequences: 2" in result.output


def test_recommend_uses_external_ids(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "gru4rec"}, "dataset": TINY_DEMO,
                                   "train": {"epochs": 1, "batch_size": 64, "progress": False}}))
    assert runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "gru")]).exit_code == 0
    result = runner.invoke(app, ["recommend", str(tmp_path / "gru"), "item00001", "item00002", "-k", "5",
                                 "--exclude-seen"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("item")]
    assert len(lines) == 5 and not any(ln.split("\t")[0] in ("item00001", "item00002") for ln in lines)
    bad = runner.invoke(app, ["recommend", str(tmp_path / "gru"), "no-such-item"])
    assert bad.exit_code == 2 and "no-such-item" in bad.output
