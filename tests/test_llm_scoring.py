"""The LM layer's yes/no candidate scorer and its shared-prefix key/value cache, and the one LM builder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from distillrec.errors import ConfigError  # noqa: E402
from distillrec.llm.builder import LMSpec, build_multimodal, multimodal_config  # noqa: E402
from distillrec.llm.scoring import p_yes, score_yes_no, shared_prefix_length, yes_no_ids  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

D_IMG = 8


@pytest.fixture(scope="module")
def mm():
    torch.set_num_threads(1)
    spec = LMSpec(name="tiny", seed=0)
    cfg = multimodal_config(spec, {"connector": "mlp", "lora_r": 4, "lora_dropout": 0.0}, d_image=D_IMG)
    return build_multimodal(spec, cfg, device="cpu").eval()


def _prompts(mm, n: int, history: str = "red shoes; blue shirt; green hat") -> list[str]:
    instruction = f"A user viewed these items, most recent last: {history}.\nCandidate item:"
    return [mm.item_prompt(f"item number {i} of colour {'red' if i % 2 else 'blue'}", instruction)
            + "\nWill the user view the candidate item next? Answer yes or no." for i in range(n)]


def test_builder_is_seeded_and_names_a_bad_lm():
    spec = LMSpec(name="tiny", seed=3)
    cfg = multimodal_config(spec, {"connector": "mlp"}, d_image=D_IMG)
    a, b = build_multimodal(spec, cfg, device="cpu"), build_multimodal(spec, cfg, device="cpu")
    assert torch.equal(a.connector.out_layer.weight, b.connector.out_layer.weight)
    c = build_multimodal(spec, cfg, device="cpu", seed=4)
    assert not torch.equal(a.connector.out_layer.weight, c.connector.out_layer.weight)
    assert LMSpec.model_validate("tiny").name == "tiny"  # `lm: tiny` in YAML
    with pytest.raises(ConfigError, match="lm.name '/no/such/model'"):
        build_multimodal(LMSpec(name="/no/such/model"), cfg, device="cpu")
    with pytest.raises(ConfigError, match=r"\['d_image'\] are set by"):
        multimodal_config(spec, {"d_image": 3}, reserved_by="the run", d_image=D_IMG)
    with pytest.raises(ConfigError, match="multimodal"):
        multimodal_config(spec, {"conector": "mlp"})


def test_scores_do_not_depend_on_batching_and_the_cache_changes_nothing_but_cost(mm):
    prompts = _prompts(mm, 11)
    img = torch.randn(11, 1, D_IMG, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(11, dtype=torch.bool)
    mask[3] = False  # one candidate without an image
    stats: dict = {}
    a = score_yes_no(mm, prompts, img, mask, batch_size=11, stats=stats)
    assert a.shape == (11,) and torch.isfinite(a).all() and a.std() > 0
    assert stats["candidates"] == 11 and stats["prefix_tokens"] == 0
    b = score_yes_no(mm, prompts, img, mask, batch_size=4)
    assert torch.allclose(a, b, atol=1e-4)
    kv: dict = {}
    k = score_yes_no(mm, prompts, img, mask, batch_size=4, kv_cache=True, stats=kv)
    assert torch.allclose(a, k, atol=1e-4)
    assert kv["prefix_tokens"] > 10 and kv["tokens"] < stats["tokens"]
    # each score is the candidate's own: scoring one prompt alone gives the same number
    one = score_yes_no(mm, prompts[5:6], img[5:6], mask[5:6])
    assert one[0] == pytest.approx(float(a[5]), abs=1e-4)
    # another history, other scores
    c = score_yes_no(mm, _prompts(mm, 11, "a lamp"), img, mask, batch_size=11)
    assert not torch.allclose(a, c)
    p = p_yes(a)
    assert ((p > 0) & (p < 1)).all() and torch.equal(p.argsort(), a.argsort())


def test_scores_are_the_yes_no_logit_difference_at_the_last_position(mm):
    prompts = _prompts(mm, 2)
    yes, no = yes_no_ids(mm.tokenizer)
    s = score_yes_no(mm, prompts)
    with torch.no_grad():
        enc = mm.encode(prompts[:1], [None], None, padding_side="left")
        logits = mm.lm(inputs_embeds=enc["inputs_embeds"], attention_mask=enc["attention_mask"],
                       position_ids=enc["position_ids"]).logits[0, -1].float()
    assert float(s[0]) == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)


def test_shared_prefix_length_by_hand():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 9, 9]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert shared_prefix_length(ids, attn, ids[0]) == 2
    soft = torch.tensor([[5, -1, 7], [5, -1, 7]])
    assert shared_prefix_length(soft, torch.ones_like(soft), soft[0]) == 1  # soft image slots never count
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert shared_prefix_length(same, torch.ones_like(same), same[0]) == 2  # each row keeps a token of its own
