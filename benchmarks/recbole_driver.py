"""Train and test one RecBole 1.2.1 model; run by ``recbole_compare.py`` with the RecBole venv's python.

Imports only recbole, torch and the standard library (it runs in RecBole's own virtual environment). Usage::

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 <venv>/bin/python recbole_driver.py spec.json

``spec.json``: {"model": "SASRec", "dataset": "ml-100k", "threads": 2, "config": {... RecBole config dict ...},
"split_out": "path.tsv"}. RecBole's logs (./log, ./log_tensorboard) go to the working directory, so run it from a
scratch folder. The last stdout line is ``RECBOLE_RESULT {json}`` with per-epoch train seconds, per-epoch
validation seconds and scores, best-valid test metrics, per-user test NDCG@10 / HR@10 (from RecBole's own top-k
hits), one timed full-ranking valid+test pass with the best model, and the peak RSS of this process.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    import recbole

    t_import = time.perf_counter() - t_start
    config = Config(model=spec["model"], dataset=spec["dataset"], config_dict=spec["config"])
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    t_data = time.perf_counter() - t0
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    # the exact split RecBole made, by external tokens, to check against ours
    if spec.get("split_out"):
        uf, itf = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
        rows = {}
        for part, data in (("valid", valid_data), ("test", test_data)):
            feat = data._dataset.inter_feat
            users = dataset.id2token(uf, feat[uf].numpy())
            items = dataset.id2token(itf, feat[itf].numpy())
            for u, i in zip(users, items):
                rows.setdefault(str(u), {})[part] = str(i)
        with open(spec["split_out"], "w") as f:
            f.write("user_id\tvalid_item\ttest_item\n")
            for u, r in rows.items():
                f.write(f"{u}\t{r.get('valid', '')}\t{r.get('test', '')}\n")

    train_s, valid_s, valid_scores = [], [], []
    orig_train, orig_valid = trainer._train_epoch, trainer._valid_epoch

    def timed_train(*a, **k):
        t = time.perf_counter()
        out = orig_train(*a, **k)
        train_s.append(round(time.perf_counter() - t, 3))
        print(f"[recbole] epoch {len(train_s)} train {train_s[-1]:.1f}s loss {float(out):.4f}", file=sys.stderr,
              flush=True)
        return out

    def timed_valid(*a, **k):
        t = time.perf_counter()
        score, result = orig_valid(*a, **k)
        valid_s.append(round(time.perf_counter() - t, 3))
        valid_scores.append(float(score))
        print(f"[recbole] epoch {len(valid_s)} valid {score:.4f} ({valid_s[-1]:.2f}s)", file=sys.stderr, flush=True)
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
    captured = {}
    orig_evaluate = trainer.evaluator.evaluate

    def capture(struct):
        captured["topk"] = struct.get("rec.topk").clone()
        return orig_evaluate(struct)

    trainer.evaluator.evaluate = capture

    trainer.fit(train_data, valid_data, saved=True, show_progress=False, verbose=True)
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    topk = captured["topk"]  # [n_users, max_k + 1]: hit flags at ranks 1..max_k, then the number of positives
    hits10 = topk[:, :10].float()
    discounts = 1.0 / torch.log2(torch.arange(2, 12, dtype=torch.float64))
    ndcg_u = (hits10.double() * discounts).sum(1).numpy()
    hr_u = hits10.sum(1).clamp(max=1).double().numpy()
    valid_result = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)

    # one timed full-ranking pass over valid + test with the (already loaded) best model
    t0 = time.perf_counter()
    trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    eval_pass_s = time.perf_counter() - t0

    best = max(valid_scores) if valid_scores else float("nan")
    # RecBole keeps a checkpoint when score >= best so far: a tie moves the best epoch later
    best_epoch, running = 0, -math.inf
    for e, s in enumerate(valid_scores, 1):
        if s >= running:
            running, best_epoch = s, e
    n = len(ndcg_u)
    out = {
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": spec["model"],
        "dataset": spec["dataset"],
        "n_items_incl_pad": int(dataset.item_num),
        "n_users": int(dataset.user_num) - 1,
        "train_rows": int(len(train_data._dataset)),
        "train_batch_size": int(config["train_batch_size"]),
        "steps_per_epoch": int(len(train_data)),
        "epochs_run": len(train_s),
        "best_epoch": best_epoch,
        "best_valid_ndcg@10": best,
        "valid_ndcg@10_per_epoch": valid_scores,
        "train_s_per_epoch": train_s,
        "valid_s_per_epoch": valid_s,
        "eval_pass_s": round(eval_pass_s, 3),
        "eval_s_total_during_training": round(sum(valid_s), 3),
        "test": {k: float(v) for k, v in test_result.items()},
        "valid": {k: float(v) for k, v in valid_result.items()},
        "test_per_user": {
            "n": n,
            "ndcg@10_mean": float(ndcg_u.mean()),
            "ndcg@10_se": float(ndcg_u.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "hr@10_mean": float(hr_u.mean()),
        },
        "import_s": round(t_import, 3),
        "data_prep_s": round(t_data, 3),
        "wall_s": round(time.perf_counter() - t_start, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print("RECBOLE_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    main()
