"""The evaluator before and after issue 14 on one model: wall time of a valid + test full-ranking pass and how many
ranks differ (and by how much the metrics do). Prints one line per dataset/model::

    python benchmarks/eval_paths.py --datasets amazon2014-beauty ml-100k --models sasrec gru4rec

The model is the RecBole-default one of ``benchmarks/recbole_compare.py`` with fixed random weights (evaluation cost
does not depend on the weights); the old path is ``tests/test_evaluator_speed.direct_ranks`` (per-batch ``score``
and the copy-and-count rank formula). One torch thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import recbole_compare as rc  # noqa: E402
from test_evaluator_speed import direct_ranks  # noqa: E402

from distillrec.data.loaders import load_dataset  # noqa: E402
from distillrec.evaluation.evaluator import rank_valid_and_test  # noqa: E402
from distillrec.evaluation.metrics import mean_metrics  # noqa: E402
from distillrec.models.base import build_model  # noqa: E402
from distillrec.runs import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["amazon2014-beauty"])
    ap.add_argument("--models", nargs="+", default=["sasrec"], choices=sorted(rc.OUR_MODEL))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.datasets:
        spec = rc.our_dataset_spec(name)
        ds = load_dataset(spec)
        for mname in args.models:
            cfg = load_config({"model": {"name": mname, "params": rc.OUR_MODEL[mname]}, "dataset": spec,
                               "train": {"max_len": rc.MAX_LEN}})
            torch.manual_seed(0)
            model = build_model(mname, cfg.model.params, ds).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            t = time.perf_counter()
            old = direct_ranks(model, ds.valid, cfg.eval, rc.MAX_LEN), direct_ranks(model, ds.test, cfg.eval, rc.MAX_LEN)
            t_old = time.perf_counter() - t
            rank_valid_and_test(model, ds.valid, ds.test, cfg.eval, rc.MAX_LEN)  # warm-up
            t = time.perf_counter()
            new = rank_valid_and_test(model, ds.valid, ds.test, cfg.eval, rc.MAX_LEN)
            t_new = time.perf_counter() - t
            diffs = []
            for split, a, b in zip(("valid", "test"), old, new):
                ma, mb = mean_metrics(a), mean_metrics(b)
                diffs.append(f"{split}: {int((a != b).sum())} of {len(a)} ranks differ (max {int(np.abs(a - b).max())}), "
                             f"max metric difference {max(abs(ma[k] - mb[k]) for k in ma):.1e}")
            print(f"{name} {mname}: old path {t_old:.2f} s, new {t_new:.2f} s; " + "; ".join(diffs), flush=True)


if __name__ == "__main__":
    main()
