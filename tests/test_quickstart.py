"""The main job: its TPAD recipe is the documented one, and a small end-to-end run writes the whole report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

pytest.importorskip("peft")

from distillrec import quickstart as qs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# a small demo shop and a TPAD recipe with the tiny random LM: the whole quickstart in well under a minute
TINY_DEMO = {"name": "demo", "options": {"n_items": 90, "n_users": 160, "write_images": False}}
TINY_TPAD = {"lm": {"name": "tiny", "seed": 0}, "multimodal": {"connector": "mlp"},
             "image_features": "attributes_onehot", "text_fields": ["title", "category"], "text_view": None,
             "knowledge": {"max_items": 32, "batch_size": 8, "gr_items": 6, "gr_max_new_tokens": 4},
             "transfer": {"max_items": 32, "batch_size": 8}, "align": {"max_items": 32, "batch_size": 8},
             "progress": False}


def test_quickstart_tpad_recipe_is_configs_tpad_demo():
    recipe = yaml.safe_load((ROOT / "configs" / "tpad" / "demo.yaml").read_text())
    recipe.pop("out")
    assert recipe == qs.QUICKSTART_TPAD


def test_small_quickstart_runs_tpad_dimo_and_writes_the_report(tmp_path):
    demo, tiny = TINY_DEMO, TINY_TPAD
    runs = [("pop", "pop", {}, {}),
            ("dimo_tpad", "dimo", {"embedding_dim": 16, "features": qs.TPAD_FEATURES}, {"epochs": 1}),
            ("fused_sasrec_tpad", "fused_sasrec", {"features": qs.TPAD_FEATURES}, {"epochs": 1})]
    path = qs.quickstart(tmp_path, seeds=[1, 2], dataset_cfg=demo, tpad_overrides=tiny, runs=runs)
    text = path.read_text()
    for name in ("pop", "dimo_tpad", "fused_sasrec_tpad"):
        assert f"| {name} |" in text
    assert "GR image" in text and "tpad_curves.png" in text and "dimo_tpad_pca.png" in text
    assert "Transition probe" in text and "| exported (final) |" in text and "| transfer states |" in text
    assert (tmp_path / "tpad_curves.png").stat().st_size > 1000
    assert (tmp_path / "dimo_tpad_pca.png").stat().st_size > 1000
    assert (tmp_path / "tpad" / "embeddings" / "item_embeddings.safetensors").is_file()
    # the README's numbers are rendered by the quickstart, in the README's table format
    readme = (tmp_path / qs.README_RESULTS).read_text()
    assert _table(readme).splitlines()[0] == _table((ROOT / "README.md").read_text()).splitlines()[0]
    assert "| dimo_tpad (DIMO + TPAD embeddings) |" in readme and "gr: both modalities" in readme

    # a second quickstart on the same folder reuses the finished runs: nothing retrained, re-evaluated or logged
    logs = {n: (tmp_path / n / "train.log").read_bytes() for n, *_ in runs}
    stamps = {n: (tmp_path / n / "metrics.json").stat().st_mtime_ns for n, *_ in runs}
    qs.quickstart(tmp_path, seeds=[1, 2], dataset_cfg=demo, tpad_overrides=tiny, runs=runs)
    assert {n: (tmp_path / n / "train.log").read_bytes() for n, *_ in runs} == logs
    assert {n: (tmp_path / n / "metrics.json").stat().st_mtime_ns for n, *_ in runs} == stamps
    assert _table((tmp_path / "report.md").read_text(), "| run | model |") == _table(text, "| run | model |")


def _table(markdown: str, first: str = "| run | test HR@10 |") -> str:
    """The Markdown table of ``markdown`` whose header starts with ``first``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def test_the_readme_quickstart_numbers_are_those_of_a_quickstart_report():
    """The README's quickstart table and the GR and probe numbers its text quotes equal what the quickstart renders
    from its run folders (``runs/quickstart``, or ``$DISTILLREC_QUICKSTART_DIR``). A full quickstart takes about 14
    minutes on 2 cores, so this checks a finished folder and skips where there is none."""
    folder = Path(os.environ.get("DISTILLREC_QUICKSTART_DIR") or ROOT / "runs" / "quickstart")
    names = [name for name, *_ in qs.QUICKSTART_RUNS]
    if not (folder / "tpad" / "report.json").is_file() or not all((folder / n / "metrics.json").is_file()
                                                                   for n in names):
        pytest.skip(f"no finished quickstart in {folder}: run `distillrec quickstart` (or set "
                    "DISTILLREC_QUICKSTART_DIR) to check the README against it")
    readme = (ROOT / "README.md").read_text()
    assert _table(readme) == qs.readme_table(folder, names)
    flat = " ".join(readme.split())  # the README wraps its lines
    numbers = qs.readme_tpad_numbers(json.loads((folder / "tpad" / "report.json").read_text()))
    assert set(numbers) == {"gr", "probe"}
    for phrase in numbers.values():
        assert phrase in flat, phrase


def test_parallel_quickstart_runs_give_the_in_process_numbers(tmp_path):
    # TPAD on one thread with one-thread `distillrec train` workers beside it gives exactly the embeddings and the
    # metrics of everything run one after the other in this process; the run on the
    # raw MiniLM features reads TPAD's text fields in its own process too (dataset.encoder_text_fields)
    from safetensors.numpy import load_file

    demo, tiny = TINY_DEMO, TINY_TPAD
    runs = [("pop", "pop", {}, {}),
            ("gru4rec", "gru4rec", {"embedding_size": 16, "hidden_size": 16}, {"epochs": 2}),
            ("dimo_raw", "dimo", {"embedding_dim": 16, "features": ["text_minilm"]}, {"epochs": 1}),
            ("dimo_tpad", "dimo", {"embedding_dim": 16, "features": qs.TPAD_FEATURES}, {"epochs": 1})]
    metrics, embeddings = {}, {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        one_by_one = {**tiny, "num_threads": 1}  # what workers=2 gives TPAD (its float sums depend on the count)
        qs.quickstart(out, seeds=[1], dataset_cfg=demo, tpad_overrides=tiny if workers > 1 else one_by_one,
                      runs=runs, workers=workers)
        metrics[workers] = {n: json.loads((out / n / "metrics.json").read_text())["test"] for n, *_ in runs}
        embeddings[workers] = load_file(str(out / "tpad" / "embeddings" / "item_embeddings.safetensors"))
    assert metrics[1] == metrics[2]
    assert embeddings[1].keys() == embeddings[2].keys()
    for k in embeddings[1]:
        assert (embeddings[1][k] == embeddings[2][k]).all(), k
    for name in ("gru4rec", "dimo_raw", "dimo_tpad"):
        assert (tmp_path / "w2" / "logs" / f"{name}.log").is_file()
    raw_cfg = yaml.safe_load((tmp_path / "w2" / "dimo_raw" / "config.yaml").read_text())
    assert raw_cfg["dataset"]["encoder_text_fields"] == ["title", "category"]
    assert "encoder_text_fields" not in yaml.safe_load((tmp_path / "w2" / "pop" / "config.yaml").read_text())["dataset"]


def test_a_run_names_an_unknown_encoder_text_field_and_gets_the_fields_there_are():
    from distillrec.errors import ConfigError
    from distillrec.runs import load_config, load_run_dataset

    cfg = load_config({"model": {"name": "dimo", "params": {"features": ["text_minilm"]}},
                       "dataset": {**TINY_DEMO, "encoder_text_fields": ["title", "colour_name"]}})
    with pytest.raises(ConfigError, match=r"dataset.encoder_text_fields: unknown text field\(s\) \['colour_name'\]"):
        load_run_dataset(cfg)
