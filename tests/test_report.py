"""The shared renderers of evaluation/report.py: the number formatter, the Markdown table and the line plots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distillrec.evaluation.report import MISSING, Panel, fmt_number, markdown_table, plot_curves, plot_panels


def test_fmt_number():
    assert fmt_number(0.123456) == "0.1235"
    assert fmt_number(0.123456, 2) == "0.12" and fmt_number(512.6, 0) == "513"
    assert fmt_number(np.float32(0.5), 3) == "0.500" and fmt_number(np.int64(3), 1) == "3.0"
    assert fmt_number(2) == "2.0000"
    assert fmt_number(None) == MISSING == "–" and fmt_number(float("nan"), 2) == "–" and fmt_number(np.nan) == "–"
    assert fmt_number(math.inf, 1) == "inf"
    assert fmt_number("n/a") == "n/a" and fmt_number(True) == "True"
    # mean ± confidence half-width; a zero (one seed) or missing half-width prints the mean alone
    assert fmt_number(0.25, ci=0.0123) == "0.2500 ± 0.0123"
    assert fmt_number(0.25, 2, ci=0.0) == "0.25" and fmt_number(0.25, ci=None) == "0.2500"
    assert fmt_number(0.25, ci=1e-12) == "0.2500" and fmt_number(None, ci=0.1) == "–"


def test_markdown_table():
    text = markdown_table(["run", "ndcg@10"], [["a", fmt_number(0.1)], ["b|c", "two\nlines"]])
    assert text == "| run | ndcg@10 |\n|---|---|\n| a | 0.1000 |\n| b\\|c | two lines |"
    assert markdown_table(["x"], []) == "| x |\n|---|"
    assert markdown_table(["n", "k"], [(1, None)]) == "| n | k |\n|---|---|\n| 1 | None |"
    with pytest.raises(ValueError, match="a row has 1 cells, the header 2"):
        markdown_table(["a", "b"], [["only one"]])


def test_plot_panels_and_curves(tmp_path):
    panels = [Panel([("loss", [0, 1, 2], [3.0, 2.0, 1.5])], title="stage a", xlabel="step"),
              Panel([("x", [0, 1], [1, None]), ("y", [0, 1], [0.5, 0.2])], ylabel="v", legend=False)]
    out = plot_panels(panels, tmp_path / "p.png", panel_size=(3.0, 2.0))
    assert out == tmp_path / "p.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [{"epoch": e, "train_loss": 1.0 / e, "valid_ndcg@10": 0.1 * e} for e in (1, 2, 3)]
    assert plot_curves([{"seed": 1, "history": history}, {"seed": 2, "history": []}], tmp_path / "c.png") \
        == tmp_path / "c.png"
    assert plot_curves([{"seed": 1, "history": []}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
