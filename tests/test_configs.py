"""Every config the repository ships validates against the schema of the command that reads it: a misspelt key or
an out-of-range value in a recipe fails here, not an hour into a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillrec.methods.connector_alignment.config import load_alignment_config
from distillrec.methods.llmd4rec.config import load_llmd4rec_config
from distillrec.methods.mllm_msr.config import load_mllm_msr_config
from distillrec.methods.tpad.config import load_tpad_config
from distillrec.runs import load_config
from distillrec.training.embed import load_embed_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the folder a recipe lives in decides which command reads it; every other folder holds `distillrec train` runs
LOADERS = {"tpad": load_tpad_config, "align": load_alignment_config, "mllm_msr": load_mllm_msr_config,
           "llmd4rec": load_llmd4rec_config, "embed": load_embed_config}
FILES = sorted(CONFIGS.rglob("*.yaml"))


def test_configs_found():
    assert len(FILES) > 30 and {p.parent.name for p in FILES} >= set(LOADERS)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONFIGS)) for p in FILES])
def test_shipped_config_validates(path: Path):
    cfg = LOADERS.get(path.parent.name, load_config)(path)
    assert cfg is not None
