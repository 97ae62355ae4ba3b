"""LLMD4Rec: the whole loop from one config (tiny LM, demo shop), the KL directions and the sample weights by hand,
the trainer's teacher hook (off = the plain trainer, rows mapped to the windows that train their targets), the
distilled CRM as an ordinary run folder (same parameters and inference FLOPs, `evaluate` and `recommend` work),
kill-and-resume, and the one-directional ablation."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distillrec.errors import ConfigError, DataError
from distillrec.methods.llmd4rec import pipeline as d4
from distillrec.methods.llmd4rec.config import LLMD4RecConfig, load_llmd4rec_config
from distillrec.methods.llmd4rec.model import candidate_scores, centred_table, llm_step_loss
from distillrec.training.teacher import (
    TeacherHook,
    TeacherLogits,
    causal_window_sources,
    file_sha256,
    kd_kl,
    kd_loss,
    kd_weights,
)

DEMO = {"name": "demo", "options": {"n_items": 90, "n_users": 160, "write_images": False}}
QUIET = {"log": lambda s: None}
SASREC = {"name": "sasrec", "params": {"hidden_size": 16, "inner_size": 32, "max_len": 10}}
CRM_TRAIN = {"epochs": 3, "batch_size": 32, "patience": 2, "max_len": 10}


def tiny_cfg(out, **kw):
    base = {
        "dataset": DEMO, "lm": {"name": "tiny"}, "multimodal": {"lora_r": 4, "lora_dropout": 0.0},
        "crm": {"model": SASREC, "train": CRM_TRAIN}, "crm_seeds": [1, 2], "rounds": 2,
        "n_candidates": 10, "augment_top_k": 3, "history_len": 4, "item_text_chars": 30,
        "llm": {"epochs": 1, "batch_size": 8, "lr": 1e-3}, "llm_users": 24, "eval_users": 20,
        "save_every": 1, "progress": False, "out": str(out),
    }
    base.update(kw)
    return LLMD4RecConfig(**base)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("d4") / "run"
    cfg = tiny_cfg(out)
    return cfg, d4.run_llmd4rec(cfg, **QUIET), out


# ------------------------------------------------------------------------------------------------ the losses by hand
def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kl_direction_and_the_confidence_weights_by_hand():
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    student = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    T = 2.0
    pt, ps = _softmax(teacher.numpy() / T), _softmax(student.detach().numpy() / T)
    kl_ts = (pt * np.log(pt / ps)).sum(-1)  # KL(teacher || student): the direction both steps use
    kl_st = (ps * np.log(ps / pt)).sum(-1)
    assert np.allclose(kd_kl(student, teacher, T).detach().numpy(), kl_ts, atol=1e-6)
    assert not np.allclose(kl_ts, kl_st, atol=1e-3)
    q = _softmax(teacher.numpy())[:, 0]  # the teacher's confidence on the target (column 0), at T = 1
    w = q / q.sum()
    assert np.allclose(kd_weights(teacher).numpy(), w, atol=1e-6)
    assert np.allclose(kd_weights(teacher, "uniform").numpy(), [0.5, 0.5])
    loss = kd_loss(student, teacher, T, kd_weights(teacher))
    assert loss.item() == pytest.approx(float((w * kl_ts).sum() * T * T), rel=1e-5)
    loss.backward()  # the gradient reaches the student only
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_the_llm_step_loss_by_hand():
    scores = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 3.0]])
    crm = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, 0.0]])
    ce = float(np.mean([-np.log(_softmax(scores.numpy())[i, 0]) for i in range(2)]))
    loss, parts = llm_step_loss(scores, None, lam=0.5, temperature=2.0, weighting="confidence")
    assert loss.item() == pytest.approx(ce, rel=1e-5) and set(parts) == {"llm_ce"}
    loss, parts = llm_step_loss(scores, crm, lam=0.5, temperature=2.0, weighting="confidence")
    pc, pl = _softmax(crm.numpy() / 2), _softmax(scores.numpy() / 2)
    q = _softmax(crm.numpy())[:, 0]
    kd = float(((q / q.sum()) * (pc * np.log(pc / pl)).sum(-1)).sum() * 4)  # KL(p_CRM || p_LLM)
    assert parts["llm_kd"] == pytest.approx(kd, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 0.5 * kd, rel=1e-5)
    # uniform negatives (extra columns) enter the cross-entropy, not the KL term
    wide = torch.cat([scores, torch.tensor([[1.0], [-1.0]])], 1)
    loss2, parts2 = llm_step_loss(wide, crm, lam=0.5, temperature=2.0, weighting="confidence")
    assert parts2["llm_kd"] == pytest.approx(kd, rel=1e-5)
    ce2 = float(np.mean([-np.log(_softmax(wide.numpy())[i, 0]) for i in range(2)]))
    assert parts2["llm_ce"] == pytest.approx(ce2, rel=1e-5)


def test_item_table_is_centred_and_scores_are_scaled_cosines():
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    table = centred_table(states)
    assert table.shape == (4, 2) and torch.all(table[0] == 0)
    assert torch.allclose(table[1:].norm(dim=1), torch.ones(3))
    u = torch.nn.functional.normalize(torch.tensor([[1.0, -1.0]]), dim=-1)
    s = candidate_scores(u, table, torch.tensor([[1, 2]]), scale=10.0)
    assert torch.allclose(s, 10.0 * (u @ table[[1, 2]].T))


# --------------------------------------------------------------------------------------------- the trainer's hook
def _teacher_file(ds, path, favourite=5, rows=None):
    """A teacher that puts item ``favourite`` (a candidate of every row) far above the rest."""
    rows = np.arange(len(ds.train)) if rows is None else rows
    pos = np.array([len(ds.train[j]) - 1 for j in rows])
    cands, logits = [], []
    for j, p in zip(rows, pos):
        t = int(ds.train[j][p])
        others = [i for i in range(1, ds.n_items + 1) if i != t and i != favourite][:5]
        c = [t] + ([favourite] if favourite != t else []) + others
        c = c[:6]
        cands.append(c)
        logits.append([5.0 if i == favourite else 0.0 for i in c])
    TeacherLogits(rows, pos, np.array(cands), np.array(logits, np.float32), ds.fingerprint()).save(path)
    return path


def test_teacher_rows_go_to_the_window_or_prefix_that_trains_their_target():
    from distillrec.data.batching import causal_windows
    from distillrec.data.dataset import Dataset, Examples, ItemTable

    seqs = [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([3, 1]), np.array([2, 4, 6])]
    ds = Dataset("t", ItemTable([f"i{k}" for k in range(1, 8)]), seqs, Examples([], np.zeros(0, np.int64)),
                 Examples([], np.zeros(0, np.int64)))
    windows = causal_windows(seqs, 3)
    assert [(j, s) for j, s in causal_window_sources(seqs, 3)] == [(0, 3), (0, 0), (1, 0), (2, 0)]
    for (j, s), (inp, _) in zip(causal_window_sources(seqs, 3), windows):
        assert np.array_equal(inp, seqs[j][s:s + len(inp)])

    class Cfg:
        path, sha256, weight, temperature, weighting = "", None, 1.0, 1.0, "confidence"

    rows, pos = np.array([0, 0, 2]), np.array([6, 2, 2])  # targets 7, 3 and 6
    cands = np.array([[7, 1], [3, 1], [6, 1]])
    tl = TeacherLogits(rows, pos, cands, np.zeros((3, 2), np.float32), ds.fingerprint())
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        Cfg.path = str(tl.save(Path(d) / "t.safetensors"))
        hook = TeacherHook(Cfg, ds, "causal", windows, 3)
        for u, (inp, tgt) in enumerate(windows):
            for t in hook.rows_of([u]):
                assert seqs[rows[t]][pos[t]] in tgt  # the window trains this row's target
        assert sorted(np.concatenate([hook.rows_of([u]) for u in range(4)]).tolist()) == [0, 1, 2]
        ex = ds.train_examples()
        hook = TeacherHook(Cfg, ds, "prefix", np.arange(len(ex)), 3)
        for u in range(len(ex)):
            for t in hook.rows_of([u]):
                assert ex.targets[u] == seqs[rows[t]][pos[t]]
                assert np.array_equal(ex.histories[u], seqs[rows[t]][: pos[t]])


def test_the_hook_off_or_at_weight_zero_is_the_plain_trainer_and_on_it_distils(tmp_path):
    from distillrec.data.loaders import load_dataset
    from distillrec.runs import load_config, load_trained
    from distillrec.training.trainer import run

    ds = load_dataset(load_config({"model": {"name": "pop"}, "dataset": DEMO}).dataset)
    path = _teacher_file(ds, tmp_path / "teacher.safetensors", favourite=5)
    base = {"model": SASREC, "dataset": DEMO, "train": {**CRM_TRAIN, "seeds": [3], "progress": False}}
    plain = run(load_config(base), tmp_path / "plain", dataset=ds)
    assert "teacher" not in (tmp_path / "plain" / "config.yaml").read_text()
    zero = run(load_config(base, [f"train.teacher={{path: {path}, weight: 0}}"]), tmp_path / "zero", dataset=ds)
    def untimed(m):
        return [{k: v for k, v in h.items() if k != "epoch_s"} for h in m["seeds"][0]["history"]]

    assert zero["test"] == plain["test"] and untimed(zero) == untimed(plain)
    on = run(load_config(base, [f"train.teacher={{path: {path}, weight: 5.0, temperature: 1.0}}"]), tmp_path / "on",
             dataset=ds)
    assert "train_kd" in on["seeds"][0]["history"][0]
    # the distilled model learnt the teacher's favourite: item 5 rises in its scores over the training rows
    mean_rank = {}
    for name in ("plain", "on"):
        m = load_trained(tmp_path / name, 3, ds).model
        hist, lengths = __import__("distillrec.data.batching", fromlist=["pad_histories"]).pad_histories(
            [s[:-1] for s in ds.train], 10)
        with torch.no_grad():
            s = m.score({"history": hist, "lengths": lengths})
        mean_rank[name] = float((s[:, 1:] > s[:, 5:6]).sum(1).float().mean())
    assert mean_rank["on"] < mean_rank["plain"]
    # GRU4Rec, the second CRM, takes the same hook
    gru = {"model": {"name": "gru4rec", "params": {"embedding_size": 16, "hidden_size": 16}}, "dataset": DEMO,
           "train": {**CRM_TRAIN, "epochs": 1, "seeds": [3], "progress": False}}
    m = run(load_config(gru, [f"train.teacher={{path: {path}, weight: 1.0}}"]), tmp_path / "gru", dataset=ds)
    assert m["seeds"][0]["history"][0]["train_kd"] > 0


def test_teacher_file_problems_name_the_file_and_the_fix(tmp_path):
    from distillrec.data.loaders import load_dataset
    from distillrec.runs import load_config
    from distillrec.training.trainer import run

    ds = load_dataset(load_config({"model": {"name": "pop"}, "dataset": DEMO}).dataset)
    other = load_dataset(load_config({"model": {"name": "pop"}, "dataset": {"name": "demo", "options": {
        "n_items": 90, "n_users": 150, "write_images": False}}}).dataset)
    path = _teacher_file(ds, tmp_path / "t.safetensors")
    with pytest.raises(DataError, match="fingerprint"):
        TeacherLogits.load(path, other)
    with pytest.raises(ConfigError, match="not found"):
        TeacherLogits.load(tmp_path / "missing.safetensors", ds)
    bad = TeacherLogits.load(path)
    bad.candidates[:, [0, 1]] = bad.candidates[:, [1, 0]]
    with pytest.raises(DataError, match="column 0"):
        bad.check(ds)
    base = {"model": SASREC, "dataset": DEMO, "train": {**CRM_TRAIN, "epochs": 1, "seeds": [3], "progress": False}}
    with pytest.raises(DataError, match="sha256"):
        run(load_config(base, [f"train.teacher={{path: {path}, sha256: abc}}"]), tmp_path / "r", dataset=ds)
    assert file_sha256(path) != "abc"


# ------------------------------------------------------------------------------------------------------ the loop
def test_the_whole_loop_runs_from_one_config(full_run):
    cfg, report, out = full_run
    crm = report["crm"]
    assert crm["base"]["seeds"] == crm["other"]["seeds"] == [1, 2]
    assert crm["same_shapes"] and crm["base"]["params"] == crm["other"]["params"]
    assert crm["paired"]["n"] == 160 and 0 <= crm["paired"]["t_pvalue"] <= 1
    for r in (1, 2):
        t = TeacherLogits.load(out / "rounds" / f"round{r}" / "teacher.safetensors")
        assert t.candidates.shape == (report["n_distill_rows"], cfg.n_candidates + 1)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    rc = report["rounds"][0]
    assert rc["llm_step"]["forward_backward_passes"] == 24 and rc["teacher_logits"]["forward_passes"] == 160
    assert "llm_kd" in rc["llm_curve"][0]  # mutual: the LLM step has the KL term
    assert (out / "crm" / "round1" / "metrics.json").is_file()  # an intermediate round's CRM (first seed only)
    cfg_yaml = (out / "crm" / "distilled" / "config.yaml").read_text()
    assert "teacher" in cfg_yaml and "round2" in cfg_yaml
    llm = report["llm"]["test"]
    assert llm["n"] == 20 and 0 <= llm["full"]["ndcg@10"] <= 1
    # re-ranking the top-M cannot move a target outside it: hr@M is the CRM's
    assert llm["rerank"]["hr@10"] == pytest.approx(llm["crm"]["hr@10"])
    text = (out / "report.md").read_text()
    assert "distilled CRM against the plain one" in text and "Cost per round" in text


def test_a_finished_loop_reuses_everything(full_run):
    cfg, report, out = full_run
    again = d4.run_llmd4rec(cfg, **QUIET)
    assert again["crm"]["paired"] == report["crm"]["paired"] and again["llm"] == report["llm"]


def test_the_distilled_crm_is_an_ordinary_run_with_the_plain_cost(full_run):
    from torch.utils.flop_counter import FlopCounterMode

    from distillrec.cli import app
    from distillrec.data.batching import example_batch
    from distillrec.runs import load_trained

    _, _, out = full_run
    plain, dist = load_trained(out / "crm" / "plain", 1), load_trained(out / "crm" / "distilled", 1)
    assert type(plain.model) is type(dist.model)
    assert sum(p.numel() for p in plain.model.parameters()) == sum(p.numel() for p in dist.model.parameters())
    batch = example_batch(dist.dataset.test, np.arange(32), 10)
    flops = []
    for m in (plain.model, dist.model):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m.score(batch)
        flops.append(fc.get_total_flops())
    assert flops[0] == flops[1] > 0
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(out / "crm" / "distilled")])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "crm" / "distilled" / "metrics.json").read_text())
    assert f"{saved['test']['ndcg@10']:.4f}" in res.output
    res = runner.invoke(app, ["recommend", str(out / "crm" / "distilled"), "item00001", "item00002", "-k", "3"])
    assert res.exit_code == 0 and res.output.count("item") >= 3


def test_a_killed_loop_resumes_to_the_same_result(full_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from distillrec.training import teacher as teacher_mod

    _, ref_report, ref = full_run
    cfg = tiny_cfg(tmp_path / "killed")
    real_states, real_loss = d4.LLMRecommender.user_states, teacher_mod.TeacherHook.loss
    calls = {"llm": 0, "kd": 0}

    def dying_states(self, texts):  # in round 2's LLM step (3 steps of 8 rows a round, teacher logits between)
        calls["llm"] += 1
        if calls["llm"] == 3 + 10 + 2:
            raise KeyboardInterrupt
        return real_states(self, texts)

    monkeypatch.setattr(d4.LLMRecommender, "user_states", dying_states)
    with pytest.raises(KeyboardInterrupt):
        d4.run_llmd4rec(cfg, **QUIET)
    assert (tmp_path / "killed" / "llm" / "round2" / "checkpoint").is_dir()
    monkeypatch.setattr(d4.LLMRecommender, "user_states", real_states)

    def dying_loss(self, model, idx):  # in the final CRM step
        calls["kd"] += 1
        if calls["kd"] == 9:
            raise KeyboardInterrupt
        return real_loss(self, model, idx)

    calls["kd"] = 0
    monkeypatch.setattr(teacher_mod.TeacherHook, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        d4.run_llmd4rec(cfg, stages=["rounds"], **QUIET)
    monkeypatch.setattr(teacher_mod.TeacherHook, "loss", real_loss)
    report = d4.run_llmd4rec(cfg, **QUIET)
    for r in (1, 2):
        a = load_file(str(ref / "rounds" / f"round{r}" / "teacher.safetensors"))
        b = load_file(str(tmp_path / "killed" / "rounds" / f"round{r}" / "teacher.safetensors"))
        assert torch.allclose(a["logits"], b["logits"], atol=1e-5)
    assert report["crm"]["other"]["test"] == ref_report["crm"]["other"]["test"]
    assert report["llm"]["test"]["full"] == ref_report["llm"]["test"]["full"]


def test_the_one_directional_ablation_drops_the_llm_kl_term(full_run, tmp_path):
    from safetensors.torch import load_file

    _, _, ref = full_run
    cfg = tiny_cfg(tmp_path / "one", direction="llm_to_crm", rounds=1, plain_dir=str(ref / "crm" / "plain"))
    report = d4.run_llmd4rec(cfg, stages=["rounds"], **QUIET)
    assert "llm_kd" not in report["rounds"][0]["llm_curve"][0]
    mutual = load_file(str(ref / "rounds" / "round1" / "teacher.safetensors"))["logits"]
    one = load_file(str(tmp_path / "one" / "rounds" / "round1" / "teacher.safetensors"))["logits"]
    assert not torch.allclose(mutual, one)  # the same candidates, another LLM
    assert torch.equal(load_file(str(ref / "rounds" / "round1" / "crm.safetensors"))["candidates"],
                       load_file(str(tmp_path / "one" / "rounds" / "round1" / "crm.safetensors"))["candidates"])
    assert not (tmp_path / "one" / "crm" / "plain").exists()  # the shared plain run was reused


def test_config_errors_name_the_key(full_run, tmp_path):
    with pytest.raises(ConfigError, match="crm.*seeds"):
        load_llmd4rec_config({"dataset": DEMO, "crm": {"train": {"seeds": [1]}}})
    with pytest.raises(ConfigError, match="crm.*hidden_sise"):
        load_llmd4rec_config({"dataset": DEMO, "crm": {"model": {"name": "sasrec", "params": {"hidden_sise": 8}}}})
    with pytest.raises(ConfigError, match="multimodal"):
        load_llmd4rec_config({"dataset": DEMO, "multimodal": {"adapters": ["x"]}})
    with pytest.raises(ConfigError, match="direction"):
        load_llmd4rec_config({"dataset": DEMO, "direction": "both"})
    with pytest.raises(ConfigError, match="n_candidates"):
        d4.run_llmd4rec(tiny_cfg(tmp_path / "x", n_candidates=95), **QUIET)
    # a changed CRM config in a finished folder is refused, naming the differing key
    _, _, out = full_run
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    changed = tiny_cfg(work, crm={"model": SASREC, "train": {**CRM_TRAIN, "epochs": 4}})
    with pytest.raises(ConfigError, match="another config.*crm.train.epochs"):
        d4.run_llmd4rec(changed, **QUIET)
    with pytest.raises(ConfigError, match="another config.*llm.lr"):
        d4.run_llmd4rec(tiny_cfg(work, llm={"epochs": 1, "batch_size": 8, "lr": 2e-3}), **QUIET)
    # runtime settings and the number of ranked users change no cached result: accepted
    again = d4.run_llmd4rec(tiny_cfg(work, eval_users=10, num_threads=1), **QUIET)
    assert again["llm"]["test"]["n"] == 10


def test_registered_as_a_method():
    from pathlib import Path

    from distillrec.methods.registry import get_method

    spec = get_method("llmd4rec")
    assert spec.stages == ("crm_warmup", "rounds", "evaluate") and Path(spec.example).is_file()
    for name in ("demo", "beauty", "scientific-text"):
        load_llmd4rec_config(f"configs/llmd4rec/{name}.yaml")
