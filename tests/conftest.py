import os

import pytest
import torch

# two cores are shared by everything on this machine: keep each test process to one thread
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_DEMO = {"name": "demo", "options": {"n_items": 120, "n_users": 200, "seed": 1}}


@pytest.fixture
def tiny_demo_config():
    return dict(TINY_DEMO)
