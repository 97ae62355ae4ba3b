"""How large each of DIMO's weighted loss terms is: mean over 20 training batches of 256, at initialisation and with
the best-validation weights of seed 1, for each given run folder. Prints one line per run and point.

    python benchmarks/dimo_loss_terms.py runs/dimo_aux/current runs/dimo_aux/released

(the runs of docs/dimo.md, "Auxiliary-loss magnitude").
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distillrec.data.batching import example_batch  # noqa: E402
from distillrec.models import build_model  # noqa: E402
from distillrec.runs import load_trained  # noqa: E402


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    for run in runs:
        trained = load_trained(run, 1)
        ds, cfg = trained.dataset, trained.config
        examples = ds.train_examples()
        rng = np.random.default_rng(0)
        torch.manual_seed(1)
        init = build_model(cfg.model.name, cfg.model.params, ds)
        init.fit(ds)
        for name, model in (("init", init), ("best", trained.model)):
            model.train()
            sums: dict[str, float] = {}
            with torch.no_grad():
                for _ in range(20):
                    batch = example_batch(examples, rng.choice(len(examples), 256, replace=False), cfg.train.max_len)
                    for k, v in model.loss_terms(batch).items():
                        sums[k] = sums.get(k, 0.0) + float(v) / 20
            print(run, name, {k: round(v, 4) for k, v in sums.items()}, "anchor items", len(model.co_items))


if __name__ == "__main__":
    main(sys.argv[1:])
