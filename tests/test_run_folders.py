"""Run folders: resume is the default for every long command; a changed config is refused with the difference named;
--restart deletes only what the command wrote, and only in a folder that is one of its runs."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from distillrec.cli import app
from distillrec.files import prepare_out
from distillrec.errors import ConfigError

from conftest import TINY_DEMO

runner = CliRunner()


def _cfg(path, **train) -> str:
    path.write_text(yaml.safe_dump({"model": {"name": "gru4rec"}, "dataset": TINY_DEMO,
                                    "train": {"epochs": 2, "batch_size": 64, "progress": False, **train}}))
    return str(path)


def test_train_resumes_by_default_refuses_another_config_and_restarts_on_request(tmp_path):
    cfg, out = _cfg(tmp_path / "c.yaml"), tmp_path / "run"
    first = runner.invoke(app, ["train", cfg, "--out", str(out)])
    assert first.exit_code == 0, first.output
    metrics = json.loads((out / "metrics.json").read_text())
    again = runner.invoke(app, ["train", cfg, "--out", str(out)])  # finished seeds are reused, not retrained
    assert again.exit_code == 0
    reused = json.loads((out / "metrics.json").read_text())
    assert reused["test"] == metrics["test"]
    assert reused["timing"]["train_s"] == metrics["timing"]["train_s"] > 0  # the time it took, not the reuse's
    assert (out / "train.log").read_text().count("epoch 1:") == 1
    other = runner.invoke(app, ["train", cfg, "--out", str(out), "--set", "train.lr=0.01"])
    assert other.exit_code == 2 and "differs in train.lr" in other.output
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.001  # nothing overwritten
    threads = runner.invoke(app, ["train", cfg, "--out", str(out), "--set", "train.num_threads=1"])
    assert threads.exit_code == 0  # runtime settings change no result
    (out / "notes.tex").write_text("mine")
    restarted = runner.invoke(app, ["train", cfg, "--out", str(out), "--set", "train.lr=0.01", "--restart"])
    assert restarted.exit_code == 0
    assert (out / "notes.tex").read_text() == "mine"
    assert (out / "train.log").read_text().count("epoch 1:") == 1


def test_restart_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    user = tmp_path / "paper"
    user.mkdir()
    (user / "draft.tex").write_text("x")
    (user / "model").mkdir()  # a name TPAD also writes
    with pytest.raises(ConfigError, match="nothing was deleted"):
        prepare_out(user, ("model", "report.md"), restart=True, marker="config.json")
    assert (user / "draft.tex").is_file() and (user / "model").is_dir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "model").mkdir()
    (run / "draft.tex").write_text("x")
    prepare_out(run, ("model", "config.json"), restart=True, marker="config.json")
    assert not (run / "model").exists() and (run / "draft.tex").is_file()
    cfg = _cfg(tmp_path / "c.yaml")
    r = runner.invoke(app, ["train", cfg, "--out", str(user), "--restart"])
    assert r.exit_code == 0 and (user / "draft.tex").is_file()  # no run there: nothing to delete, train writes
