"""Run folders: resume is the default for every long command; a changed config is refused with the difference named;
--restart deletes only what the command wrote, and only in a folder that is one of its runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

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
    log = (out / "train.log").read_bytes()
    again = runner.invoke(app, ["train", cfg, "--out", str(out)])  # finished seeds are reused, not retrained
    assert again.exit_code == 0
    assert (out / "train.log").read_bytes() == log  # a finished run is reused as it is: nothing appended
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


# ------------------------------------------------------------------------------------------------ the folder lock
_HOLD = """
import sys, time
from distillrec.files import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_folder_and_pid_and_a_killed_holder_blocks_nothing(tmp_path):
    cfg, out = _cfg(tmp_path / "c.yaml"), tmp_path / "run"
    proc = _holder(out)
    try:
        second = runner.invoke(app, ["train", cfg, "--out", str(out)])
        assert second.exit_code == 2, second.output
        assert str(out) in second.output and f"pid {proc.pid}" in second.output
        assert "another --out" in second.output and "Traceback" not in second.output
        assert not (out / "config.yaml").exists() and not (out / "metrics.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)  # a killed holder: the OS releases its lock, its file stays behind
        proc.wait()
    assert (out / ".distillrec.lock").is_file()
    r = runner.invoke(app, ["train", cfg, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "metrics.json").is_file() and not (out / ".distillrec.lock").exists()  # released and removed


def test_method_folders_are_locked_too(tmp_path):
    proc = _holder(tmp_path / "tpad")
    try:
        with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
            prepare_out(tmp_path / "tpad", ("model",), restart=False, marker="config.json")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    prepare_out(tmp_path / "tpad", ("model",), restart=False, marker="config.json")  # held by this process now
    prepare_out(tmp_path / "tpad", ("model",), restart=False, marker="config.json")  # re-entrant


# ----------------------------------------------------------------------------------------------------- resume
def test_resume_with_another_model_config_is_refused_before_anything_is_overwritten(tmp_path):
    cfg, out = _cfg(tmp_path / "c.yaml"), tmp_path / "run"
    assert runner.invoke(app, ["train", cfg, "--out", str(out)]).exit_code == 0
    before = (out / "config.yaml").read_text()
    r = runner.invoke(app, ["train", cfg, "--out", str(out), "--resume", "--set", "model.params.hidden_size=16"])
    assert r.exit_code == 2 and "differs in model.params.hidden_size" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert (out / "config.yaml").read_text() == before
    assert runner.invoke(app, ["evaluate", str(out)]).exit_code == 0  # the folder still evaluates


def test_a_truncated_checkpoint_on_resume_is_named(tmp_path):
    cfg, out = _cfg(tmp_path / "c.yaml"), tmp_path / "run"
    assert runner.invoke(app, ["train", cfg, "--out", str(out)]).exit_code == 0
    last = out / "checkpoints" / "seed2024" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:300])
    (out / "metrics.json").unlink()  # an unfinished run: resuming reads last.safetensors
    r = runner.invoke(app, ["train", cfg, "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert str(last) in r.output and "not a readable distillrec checkpoint" in r.output


def test_tpad_restart_never_empties_a_folder_that_is_not_a_tpad_run(tmp_path):
    pytest.importorskip("peft")
    user = tmp_path / "paper"
    (user / "model").mkdir(parents=True)  # a name TPAD writes
    (user / "paper.tex").write_text("\\documentclass{article}")
    (user / "notes.txt").write_text("mine")
    recipe = tmp_path / "tpad.yaml"
    recipe.write_text(yaml.safe_dump({"dataset": {"name": "demo", "options": {"n_items": 40, "n_users": 40,
                                                                             "write_images": False}},
                                      "lm": "tiny", "out": str(user)}))
    r = runner.invoke(app, ["tpad", str(recipe), "--out", str(user), "--restart"])
    assert r.exit_code == 2 and "nothing was deleted" in r.output, r.output
    assert sorted(p.name for p in user.iterdir()) == ["model", "notes.txt", "paper.tex"]
