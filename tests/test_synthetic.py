"""The embedded demo shop: deterministic, multimodal, and with a transition process a sequential model can learn."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillrec.data.dataset import DataError
from distillrec.data.synthetic import BRANDS, CATEGORIES, COLOURS, COMPLEMENTS, make_demo_shop

SMALL = dict(n_items=300, n_users=400)


@pytest.fixture(scope="module")
def shop_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo") / "shop"


@pytest.fixture(scope="module")
def shop(shop_dir):
    return make_demo_shop(shop_dir, **SMALL, seed=0, image_size=48)


@pytest.fixture(scope="module")
def big():
    """More users (no images) for the statistical checks."""
    return make_demo_shop(n_items=300, n_users=1500, seed=1, write_images=False)


def _sequences(ds) -> list[np.ndarray]:
    """The full sequence of every user (the test history holds train + valid items)."""
    return [np.append(h, t).astype(np.int64) for h, t in zip(ds.test.histories, ds.test.targets)]


def _images_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()


def test_deterministic(shop, shop_dir, tmp_path):
    again = make_demo_shop(tmp_path / "other", **SMALL, seed=0, image_size=48)
    assert again.fingerprint() == shop.fingerprint()
    for a, b in zip(shop.train, again.train):
        assert a.tobytes() == b.tobytes()
    assert shop.test.targets.tobytes() == again.test.targets.tobytes()
    assert [t.tobytes() for t in shop.train_timestamps] == [t.tobytes() for t in again.train_timestamps]
    assert shop.items.text == again.items.text
    np.testing.assert_array_equal(shop.items.features["attributes_onehot"], again.items.features["attributes_onehot"])
    assert _images_digest(shop.items.image_paths) == _images_digest(again.items.image_paths)
    # sequences do not depend on whether or how images are drawn; another seed gives other data
    no_img = make_demo_shop(**SMALL, seed=0, write_images=False)
    assert no_img.items.image_paths is None
    assert [s.tobytes() for s in no_img.train] == [s.tobytes() for s in shop.train]
    other = make_demo_shop(**SMALL, seed=1, write_images=False)
    assert other.fingerprint() != shop.fingerprint()


def test_reuses_complete_folder(shop, shop_dir):
    png = Path(shop.items.image_paths[0])
    mtime = png.stat().st_mtime_ns
    again = make_demo_shop(shop_dir, **SMALL, seed=0, image_size=48)
    assert again.items.image_paths == shop.items.image_paths
    assert png.stat().st_mtime_ns == mtime  # not rewritten
    assert not [p for p in shop_dir.parent.iterdir() if ".tmp-" in p.name]  # no temporary folders left


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not a demo-shop folder"):
        make_demo_shop(tmp_path, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_item_table(shop):
    items = shop.items
    assert items.n_items == SMALL["n_items"] == len(items.ids) == len(set(items.ids))
    assert set(items.text) == {"title", "description", "category", "brand", "colour"}
    for name, col in items.text.items():
        assert len(col) == items.n_items and all(col), name
    assert set(items.text["category"]) == set(CATEGORIES)
    assert set(items.text["colour"]) <= set(COLOURS) and len(set(items.text["colour"])) == len(COLOURS)
    assert set(items.text["brand"]) <= set(BRANDS) and len(set(items.text["brand"])) >= 20
    i = 5
    for f in ("brand", "colour"):
        assert items.text[f][i] in items.text["title"][i]
    onehot = items.features["attributes_onehot"]
    assert onehot.shape == (items.n_items + 1, len(CATEGORIES) + len(BRANDS) + len(COLOURS))
    assert onehot.dtype == np.float32 and not onehot[0].any()
    np.testing.assert_array_equal(onehot[1:].sum(axis=1), 3.0)
    assert onehot[1 + i, CATEGORIES.index(items.text["category"][i])] == 1.0
    # each brand sells only a few categories
    per_brand = {}
    for b, c in zip(items.text["brand"], items.text["category"]):
        per_brand.setdefault(b, set()).add(c)
    assert max(len(v) for v in per_brand.values()) <= 4


def test_split_and_protocol(shop):
    assert len(shop.train) == len(shop.valid) == len(shop.test) == SMALL["n_users"]
    lengths = np.array([len(s) for s in _sequences(shop)])
    assert lengths.min() >= 4 and lengths.max() <= 20 and 6.5 < lengths.mean() < 9.5
    assert all(s.min() >= 1 and s.max() <= shop.n_items for s in shop.train)
    for j in range(len(shop.test)):
        np.testing.assert_array_equal(shop.test.histories[j][:-1], shop.valid.histories[j])
        assert shop.test.histories[j][-1] == shop.valid.targets[j]
    assert all(np.all(np.diff(t) > 0) for t in shop.train_timestamps)
    assert shop.train_users[0] == "u00001" and isinstance(shop.test.users[0], str)
    assert shop.protocol["split"] == "leave_one_out" and shop.protocol["generator"] == "demo_shop"
    assert shop.protocol["n_items"] == SMALL["n_items"] and shop.protocol["seed"] == 0


def test_images(shop):
    paths = shop.items.image_paths
    assert paths is not None and len(paths) == shop.n_items
    assert all(Path(p).is_file() for p in paths)
    img = Image.open(paths[0])
    assert img.size == (48, 48) and img.mode == "RGB"
    colours = shop.items.text["colour"]
    for name, channel in (("red", 0), ("green", 1), ("blue", 2)):
        for i in [k for k, c in enumerate(colours) if c == name][:5]:
            px = np.asarray(Image.open(paths[i]), dtype=np.float32).reshape(-1, 3)
            shape = px[np.abs(px - px.mean(axis=1, keepdims=True)).max(axis=1) > 40]  # the coloured pixels
            assert len(shape) > 30, (name, i)
            mean = shape.mean(axis=0)
            others = [mean[k] for k in range(3) if k != channel]
            assert mean[channel] > max(others) + 60, (name, i, mean)
    # category decides the shape: two items of one category look more alike than items of different ones
    cats = shop.items.text["category"]

    def mask(i):
        px = np.asarray(Image.open(paths[i]).convert("L"), dtype=np.float32)
        return np.abs(px - np.median(px)) > 20

    lenses = [k for k, c in enumerate(cats) if c == "lenses"][:2]
    laces = [k for k, c in enumerate(cats) if c == "laces"][0]
    same = (mask(lenses[0]) & mask(lenses[1])).sum() / (mask(lenses[0]) | mask(lenses[1])).sum()
    diff = (mask(lenses[0]) & mask(laces)).sum() / (mask(lenses[0]) | mask(laces)).sum()
    assert same > diff


def test_complements_are_frequent(big):
    cats = np.array([CATEGORIES.index(c) for c in big.items.text["category"]])
    cat_of = np.concatenate([[-1], cats])
    is_comp = np.zeros((len(CATEGORIES), len(CATEGORIES)), dtype=bool)
    for c, comps in COMPLEMENTS.items():
        for x in comps:
            is_comp[CATEGORIES.index(c), CATEGORIES.index(x)] = True
    src = np.concatenate([s[:-1] for s in _sequences(big)])
    dst = np.concatenate([s[1:] for s in _sequences(big)])
    observed = is_comp[cat_of[src], cat_of[dst]].mean()
    # chance: the next item's category drawn from the overall category frequencies, independent of the current one
    freq = np.bincount(cat_of[dst], minlength=len(CATEGORIES)) / len(dst)
    chance = (is_comp[cat_of[src]] * freq).sum(axis=1).mean()
    assert observed > 0.5 and observed > 3 * chance, (observed, chance)


def _hr_at_10(scores_for, examples) -> float:
    hits = 0
    for hist, target in zip(examples.histories, examples.targets):
        s = scores_for(hist).astype(np.float64)
        s[0] = -np.inf
        top = np.argpartition(-s, 10)[:10]
        hits += int(target in top)
    return hits / len(examples)


def test_markov_beats_popularity(big):
    n = big.n_items
    pop = big.item_train_counts().astype(np.float64)
    counts = np.zeros((n + 1, n + 1))
    for s in big.train:
        np.add.at(counts, (s[:-1], s[1:]), 1.0)
    tie = 1e-3 * pop / pop.max()  # popularity only breaks ties among equal transition counts
    hr_pop = _hr_at_10(lambda h: pop.copy(), big.test)
    hr_markov = _hr_at_10(lambda h: counts[h[-1]] + tie, big.test)
    assert hr_markov > hr_pop + 0.10 and hr_markov > 1.4 * hr_pop, (hr_markov, hr_pop)


def test_loader_registered(tmp_path):
    from distillrec.data.loaders import KNOWN_DATASETS, available_formats, load_dataset

    assert "demo" in available_formats() and KNOWN_DATASETS["demo"][0] == "demo"
    ds = load_dataset({"name": "demo", "options": {"n_items": 120, "n_users": 50, "write_images": False}})
    assert ds.name == "demo" and ds.n_items == 120 and len(ds.test) == 50
    with pytest.raises(DataError, match="unknown option"):
        load_dataset({"name": "demo", "options": {"n_itemz": 5}})


def test_rejects_bad_parameters():
    with pytest.raises(DataError, match="n_items"):
        make_demo_shop(n_items=5, write_images=False)
    with pytest.raises(DataError, match="n_users"):
        make_demo_shop(n_items=100, n_users=0, write_images=False)


def test_default_size_generates(tmp_path):
    ds = make_demo_shop(tmp_path / "full")  # default parameters; its timing lives in the benchmarks
    assert ds.n_items == 1500 and len(ds.test) == 3000
    assert sum(Path(p).is_file() for p in ds.items.image_paths) == 1500
