"""The sampled-candidate protocol (MLLM-MSR's 1 positive : 20 negatives) and the re-ranker mode."""

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from distillrec.cli import app
from distillrec.data.dataset import Dataset, Examples, ItemTable, leave_one_out
from distillrec.data.loaders import load_dataset
from distillrec.errors import ConfigError, DataError
from distillrec.evaluation.candidates import (
    CandidateSet,
    candidate_metrics,
    candidate_ranks,
    per_row_candidate_metrics,
    pooled_auc,
    rerank_ranks,
    sample_candidates,
    score_candidates,
    top_n_items,
)
from distillrec.evaluation.evaluator import EvalProtocol, rank_examples, sampled_protocol
from distillrec.evaluation.metrics import metrics_from_ranks
from distillrec.models import build_model

from conftest import TINY_DEMO

runner = CliRunner()


@pytest.fixture(scope="module")
def demo():
    return load_dataset(TINY_DEMO)


def _user_items(ds: Dataset) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}
    for u, seq in zip(ds.train_users, ds.train):
        seen.setdefault(u, set()).update(seq.tolist())
    for ex in (ds.valid, ds.test):
        for u, h, t in zip(ex.users, ex.histories, ex.targets):
            seen.setdefault(u, set()).update(h.tolist() + [int(t)])
    return seen


# ------------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("split", ["test", "valid"])
def test_negatives_are_never_interacted_items_and_deterministic_by_seed(demo, split):
    cands = sample_candidates(demo, split, n_negatives=20, seed=3)
    ex = getattr(demo, split)
    seen = _user_items(demo)
    assert cands.items.shape == (len(ex), 21) and cands.rows.tolist() == list(range(len(ex)))
    assert np.array_equal(cands.items[:, 0], ex.targets)
    for r, row in zip(cands.rows, cands.items):
        neg = row[1:]
        assert len(set(neg.tolist())) == 20 and neg.min() >= 1 and neg.max() <= demo.n_items
        assert not set(neg.tolist()) & seen[ex.users[r]]
    again = sample_candidates(demo, split, n_negatives=20, seed=3)
    assert np.array_equal(again.items, cands.items) and again.dataset_fingerprint == demo.fingerprint()
    other = sample_candidates(demo, split, n_negatives=20, seed=4)
    assert not np.array_equal(other.items[:, 1:], cands.items[:, 1:])
    assert np.array_equal(other.items[:, 0], cands.items[:, 0])


def test_max_users_and_rows_select_rows_with_the_same_negatives(demo):
    full = sample_candidates(demo, n_negatives=5, seed=1)
    some = sample_candidates(demo, n_negatives=5, seed=1, max_users=30)
    assert len(some) == 30 and np.all(np.diff(some.rows) > 0)
    assert np.array_equal(some.items, full.items[some.rows])  # each row has its own random stream
    assert not np.array_equal(sample_candidates(demo, n_negatives=5, seed=2, max_users=30).rows, some.rows)
    explicit = sample_candidates(demo, n_negatives=5, seed=1, rows=[7, 2])
    assert explicit.rows.tolist() == [7, 2] and np.array_equal(explicit.items, full.items[[7, 2]])
    assert len(sample_candidates(demo, n_negatives=5, seed=1, max_users=10**6)) == len(demo.test)
    with pytest.raises(ConfigError, match="rows"):
        sample_candidates(demo, rows=[len(demo.test)])
    with pytest.raises(ConfigError, match="valid or test"):
        sample_candidates(demo, "train")


def _toy() -> Dataset:
    items = ItemTable(ids=[f"i{k}" for k in range(1, 7)])
    # user a: 1 2 3 4 -> train [1 2], valid 3, test 4; user b: 5 6 1 -> train [5], valid 6, test 1
    return leave_one_out("toy", items, [np.array([1, 2, 3, 4]), np.array([5, 6, 1])], ["a", "b"])


def test_negatives_exclude_the_users_other_parts_and_too_few_unseen_items_is_an_error():
    ds = _toy()
    cands = sample_candidates(ds, "valid", n_negatives=2, seed=0)
    # user a's valid row: history [1 2], target 3; item 4 (its test target) is excluded too -> only 5 and 6 remain
    assert cands.items[0, 0] == 3 and sorted(cands.items[0, 1:].tolist()) == [5, 6]
    assert cands.items[1, 0] == 6 and sorted(cands.items[1, 1:].tolist()) in ([2, 3], [2, 4], [3, 4])
    with pytest.raises(ConfigError, match=r"row 0 \(user a\) has only 2 items.*n_negatives=3"):
        sample_candidates(ds, "valid", n_negatives=3)
    # without user ids only the row's own history and target are excluded
    ds.valid = Examples(ds.valid.histories, ds.valid.targets, None)
    no_users = sample_candidates(ds, "valid", n_negatives=3, seed=0)
    assert sorted(no_users.items[0, 1:].tolist()) == [4, 5, 6]


def test_save_load_round_trip_and_a_different_dataset_is_refused(demo, tmp_path):
    cands = sample_candidates(demo, "valid", n_negatives=7, seed=5, max_users=40)
    path = cands.save(tmp_path / "c.safetensors")
    back = CandidateSet.load(path, demo)
    assert (back.split, back.seed, back.n_negatives, back.dataset_fingerprint) == ("valid", 5, 7,
                                                                                    demo.fingerprint())
    assert np.array_equal(back.rows, cands.rows) and np.array_equal(back.items, cands.items)
    assert back.rows.dtype == np.int64 and back.items.dtype == np.int64
    assert sampled_protocol(back) == sampled_protocol(cands)
    assert "SAMPLED" in sampled_protocol(cands)["label"]
    assert sampled_protocol(sample_candidates(demo, "valid", n_negatives=7, seed=6, max_users=40))["hash"] != \
        sampled_protocol(cands)["hash"]
    ex = back.examples(demo)
    assert np.array_equal(ex.targets, demo.valid.targets[cands.rows])
    assert ex.users == [demo.valid.users[i] for i in cands.rows]
    other = load_dataset({**TINY_DEMO, "options": {**TINY_DEMO["options"], "seed": 2}})
    with pytest.raises(DataError, match=r"c\.safetensors.*fingerprint.*sample again"):
        CandidateSet.load(path, other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DataError, match="junk.safetensors"):
        CandidateSet.load(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="not found"):
        CandidateSet.load(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------------ ranks and metrics
def test_candidate_ranks_are_pessimistic_and_nan_is_minus_infinity():
    scores = np.array([
        [5.0, 1.0, 2.0, 3.0],  # best -> 0
        [2.0, 2.0, 1.0, 3.0],  # one tie, one above -> 2
        [1.0, 1.0, 1.0, 1.0],  # constant -> C - 1
        [np.nan, 0.0, -1.0, 1.0],  # NaN target = -inf -> last
        [0.0, np.nan, np.nan, -1.0],  # NaN negatives below the target -> 0
    ])
    assert candidate_ranks(scores).tolist() == [0, 2, 3, 3, 0]
    assert candidate_ranks(torch.tensor(scores)).tolist() == [0, 2, 3, 3, 0]
    assert np.isnan(scores).sum() == 3  # the caller's matrix is not changed


def test_candidate_metrics_by_hand():
    scores = np.array([
        [5.0, 1.0, 2.0, 3.0],  # rank 0, auc 1
        [2.0, 2.0, 1.0, 3.0],  # rank 2, auc (1 + 0.5) / 3
        [1.0, 1.0, 1.0, 1.0],  # rank 3, auc 0.5
    ])
    per = per_row_candidate_metrics(scores, ks=(1, 5))
    assert np.allclose(per["auc"], [1.0, 0.5, 0.5])
    assert per["hr@1"].tolist() == [1, 0, 0] and per["hr@5"].tolist() == [1, 1, 1]
    assert np.allclose(per["mrr@5"], [1, 1 / 3, 1 / 4])
    assert np.allclose(per["ndcg@5"], [1, 1 / np.log2(4), 1 / np.log2(5)])
    m = candidate_metrics(scores, ks=(1, 5))
    assert m["n"] == 3 and m["auc"] == pytest.approx(2 / 3) and m["hr@1"] == pytest.approx(1 / 3)
    perfect = candidate_metrics(np.tile([[9.0, 1.0, 2.0, 3.0, 4.0]], (4, 1)))
    assert perfect["auc"] == 1.0 and perfect["hr@1"] == 1.0 and perfect["ndcg@5"] == 1.0
    assert perfect["auc_pooled"] == 1.0
    constant = candidate_metrics(np.zeros((6, 21)))
    assert candidate_ranks(np.zeros((6, 21))).tolist() == [20] * 6
    assert constant["auc"] == 0.5 and constant["auc_pooled"] == 0.5 and constant["hr@10"] == 0.0


def test_pooled_auc_mixes_users_as_sklearn_does():
    # every user's positive is on top, but user 2's scores are all lower than user 1's: per-row AUC 1, pooled < 1
    scores = np.array([[10.0, 8.0, 7.0], [3.0, 2.0, 1.0]])
    m = candidate_metrics(scores)
    assert m["auc"] == 1.0 and m["auc_pooled"] == pytest.approx(0.75)
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=(30, 6)).astype(float)  # many ties
    labels = np.zeros_like(s)
    labels[:, 0] = 1
    assert pooled_auc(s) == pytest.approx(sklearn.roc_auc_score(labels.ravel(), s.ravel()))


# ---------------------------------------------------------------------------------------------------- with a model
def test_score_candidates_equals_gathering_the_full_score_rows(demo):
    torch.manual_seed(0)
    model = build_model("sasrec", {}, demo)
    model.fit(demo)
    model.eval()
    cands = sample_candidates(demo, n_negatives=20, seed=0, max_users=50)
    ex = cands.examples(demo)
    from distillrec.data.batching import example_batch

    with torch.no_grad():
        full = model.score(example_batch(ex, np.arange(len(ex)), 50)).numpy()
    expected = np.take_along_axis(full, cands.items, axis=1)
    got = score_candidates(model, ex, cands, max_len=50, batch_size=7)
    assert got.dtype == np.float32 and got.shape == (50, 21)
    assert np.allclose(got, expected, atol=1e-5)
    # the whole split's Examples, indexed by the candidate rows, give the same matrix
    assert np.allclose(score_candidates(model, demo.test, cands, max_len=50, batch_size=16), got, atol=1e-5)
    with pytest.raises(DataError, match="targets differ"):
        score_candidates(model, demo.valid, cands, max_len=50)


class TiedScores(torch.nn.Module):
    """Items 1..6: scores 1, 3, 3, 0, 3, 2 for every history (items 2, 3, 5 tie on top)."""

    def score(self, batch):
        return torch.tensor([[7.0, 1, 3, 3, 0, 3, 2]]).repeat(len(batch["target"]), 1)


def test_top_n_items_orders_ties_by_id_and_gives_pessimistic_full_ranks():
    ex = Examples([np.array([1]), np.array([2, 4]), np.array([3])], np.array([3, 6, 4]))
    top, ranks = top_n_items(TiedScores(), ex, None, 4, max_len=5, batch_size=2)
    assert top.tolist() == [[2, 3, 5, 6]] * 3  # padding (score 7) never included
    assert ranks.tolist() == [2, 3, 5]  # target 3 tied with 2 and 5 -> 2; 6 -> 3; 4 last -> 5
    full = rank_examples(TiedScores(), ex, EvalProtocol(), max_len=5)
    assert ranks.tolist() == full.tolist()
    top_rows, ranks_rows = top_n_items(TiedScores(), ex, [2, 0], 2, max_len=5)
    assert top_rows.tolist() == [[2, 3], [2, 3]] and ranks_rows.tolist() == [5, 2]


def test_rerank_ranks_inside_and_outside_the_top_n():
    top = np.array([[4, 9, 2], [4, 9, 2], [4, 9, 2], [1, 2, 3]])
    base_ranks = np.array([2, 0, 7, 3])
    targets = np.array([2, 4, 8, 1])
    rerank = np.array([
        [0.1, 0.2, 0.9],  # target 2 (column 2) scored best by the re-ranker -> 0
        [0.5, 0.5, 0.1],  # target 4 tied with item 9 -> pessimistic 1
        [0.3, 0.2, 0.1],  # target 8 not in the top-3 -> keeps its base rank 7
        [np.nan, 0.0, 0.0],  # NaN = -inf -> last among the 3
    ])
    ranks = rerank_ranks(top, base_ranks, targets, rerank)
    assert ranks.tolist() == [0, 1, 7, 2]
    assert metrics_from_ranks(ranks, (1,))["hr@1"].tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="outside the top-3"):
        rerank_ranks(top[2:3], np.array([1]), np.array([8]), rerank[2:3])


# ------------------------------------------------------------------------------------------------- command line
def test_cli_candidates_then_evaluate_a_run_on_them(tmp_path, demo):
    cfg = tmp_path / "gru.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "gru4rec"}, "dataset": TINY_DEMO,
                                   "train": {"epochs": 1, "batch_size": 64, "progress": False, "seeds": [1, 2]}}))
    assert runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "gru")]).exit_code == 0
    out = tmp_path / "cands.safetensors"
    result = runner.invoke(app, ["candidates", str(cfg), "--out", str(out), "--max-users", "60", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert "SAMPLED" in result.output and out.is_file()
    cands = CandidateSet.load(out, demo)
    assert len(cands) == 60 and cands.n_negatives == 20 and cands.split == "test"
    # a dataset config file gives the same candidates
    ds_cfg = tmp_path / "ds.yaml"
    ds_cfg.write_text(yaml.safe_dump(TINY_DEMO))
    out2 = tmp_path / "cands2.safetensors"
    assert runner.invoke(app, ["candidates", str(ds_cfg), "--out", str(out2), "--max-users", "60", "--seed", "4"]
                         ).exit_code == 0
    assert np.array_equal(CandidateSet.load(out2).items, cands.items)

    result = runner.invoke(app, ["evaluate", str(tmp_path / "gru"), "--candidates", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("SAMPLED: 1 target + 20")
    report = json.loads(result.output[result.output.index("{"):])
    assert [s["seed"] for s in report["seeds"]] == [1, 2] and report["n"] == 60
    assert report["protocol"]["hash"] == sampled_protocol(cands)["hash"]
    for key in ("auc", "auc_pooled", "hr@1", "ndcg@5", "mrr@10"):
        assert report["mean"][key] == pytest.approx(np.mean([s[key] for s in report["seeds"]]))
    # the same numbers as scoring the run by hand
    from distillrec.runs import score_run_on_candidates

    by_hand = candidate_metrics(score_run_on_candidates(tmp_path / "gru", cands, seed=2))
    assert report["seeds"][1]["ndcg@10"] == pytest.approx(by_hand["ndcg@10"])
    # without --candidates: full ranking as before
    assert '"valid"' in runner.invoke(app, ["evaluate", str(tmp_path / "gru")]).output


def test_cli_refuses_a_wrong_candidate_file_in_one_line(tmp_path):
    pop = tmp_path / "pop.yaml"
    pop.write_text(yaml.safe_dump({"model": {"name": "pop"}, "dataset": TINY_DEMO}))
    assert runner.invoke(app, ["train", str(pop), "--out", str(tmp_path / "pop")]).exit_code == 0
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"dataset": {**TINY_DEMO, "options": {**TINY_DEMO["options"], "seed": 2}}}))
    wrong = tmp_path / "wrong.safetensors"
    assert runner.invoke(app, ["candidates", str(other), "--out", str(wrong), "--max-users", "5"]).exit_code == 0
    for path, expected in ((wrong, "fingerprint"), (tmp_path / "none.safetensors", "not found")):
        result = runner.invoke(app, ["evaluate", str(tmp_path / "pop"), "--candidates", str(path)])
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and path.name in lines[0] and expected in lines[0], result.output
        assert "Traceback" not in result.output
    bad = runner.invoke(app, ["candidates", str(pop), "--out", str(tmp_path / "x.safetensors"), "--split", "train"])
    assert bad.exit_code == 2 and "valid or test" in bad.output
    bad = runner.invoke(app, ["candidates", str(pop), "--out", str(tmp_path / "x.safetensors"), "--negatives", "500"])
    assert bad.exit_code == 2 and "lower --negatives" in bad.output
