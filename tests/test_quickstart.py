"""The main job: its TPAD recipe is the documented one, and a small end-to-end run writes the whole report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("peft")

from distillrec import quickstart as qs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_tpad_recipe_is_configs_tpad_demo():
    recipe = yaml.safe_load((ROOT / "configs" / "tpad" / "demo.yaml").read_text())
    recipe.pop("out")
    assert recipe == qs.QUICKSTART_TPAD


def test_small_quickstart_runs_tpad_dimo_and_writes_the_report(tmp_path):
    demo = {"name": "demo", "options": {"n_items": 90, "n_users": 160, "write_images": False}}
    tiny = {"lm": {"name": "tiny", "seed": 0}, "multimodal": {"connector": "mlp"},
            "image_features": "attributes_onehot", "text_fields": ["title", "category"], "text_view": None,
            "knowledge": {"max_items": 32, "batch_size": 8, "gr_items": 6, "gr_max_new_tokens": 4},
            "transfer": {"max_items": 32, "batch_size": 8}, "align": {"max_items": 32, "batch_size": 8},
            "progress": False}
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
