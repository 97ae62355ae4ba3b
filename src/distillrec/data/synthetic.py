"""The embedded demo data: a small, deterministic, multimodal shop generated locally in seconds (no download).

``make_demo_shop()`` builds a canonical :class:`~distillrec.data.dataset.Dataset` (used by ``distillrec quickstart``
and the tests); it is also the loader format ``"demo"`` and the known dataset name ``"demo"``, so a config can say
``dataset: {name: demo, options: {n_users: 1000}}``.

Catalogue (defaults: ``n_items=1500``, ``seed=0``)
--------------------------------------------------
- 12 categories in 4 departments (see :data:`DEPARTMENTS`): footwear (shoes, socks, laces), photo (cameras, lenses,
  tripods), kitchen (kettles, mugs, teapots), cycling (bicycles, helmets, bottles). Items are spread evenly over the
  categories (``item k`` gets category ``k mod 12`` before a seeded shuffle).
- 30 brands (:data:`BRANDS`); each brand sells 2 categories of one department and, with probability 0.25, one
  category of another department. Every category has at least 3 brands. An item's brand is drawn uniformly from the
  brands that sell its category.
- 10 colours (:data:`COLOURS`, each with an RGB value) drawn with fixed weights (black and white most common).
- Text fields ``title`` (``"<Brand> <Model> <colour> <noun>"``), ``description`` (two sentences built from the
  category's feature phrases), ``category``, ``brand``, ``colour``.
- One ``image_size`` x ``image_size`` PNG per item, drawn with PIL: the shape depends on the category (a shoe polygon,
  an L-shaped sock, a zig-zag lace, a camera body with a lens, ...), the fill is the item's colour (each channel
  jittered by up to +-12), on a neutral grey background; the position (+-6% of the size), the scale (0.30-0.38 of
  the size) and mild pixel noise (Gaussian, sigma 3) vary per item. Images depend only on
  ``(n_items, seed, image_size)``.
- A feature matrix ``attributes_onehot`` (category + brand + colour one-hot, 52 columns) so fused models can be tested
  without any encoder.

Sequences (the true transition process, defaults ``n_users=3000``)
------------------------------------------------------------------
Item popularity is Zipf: ``pop[i] = 1 / rank[i] ** 1.0`` over a seeded random ranking. Every user ``u`` has a set
of 3 preferred brands and one preferred colour. For a candidate item ``j`` the *user weight* is::

    w_u(j) = pop[j] ** 0.5 * (6 if brand[j] in brands_u else 1) * (4 if colour[j] == colour_u else 1)

The first item is drawn with probability proportional to ``w_u``. Given the current item ``i`` the next item is drawn
from a mixture:

(a) with probability 0.60, a *complement*: a category ``c`` uniform over :data:`COMPLEMENTS` ``[category[i]]``
    (e.g. shoes -> socks or laces, cameras -> lenses or tripods), then ``j`` in ``c`` with probability proportional to
    ``w_u(j) * (3 if brand[j] == brand[i] else 1) * (2 if colour[j] == colour[i] else 1)`` (brand loyalty and a
    matching colour);
(b) with probability 0.15, another item of the *same category* (not ``i``), weighted the same way;
(c) with probability 0.25, a *popularity* draw: ``j`` proportional to ``pop[j]`` over all items (any department).

Lengths are ``4 + NegBinomial(2, 1/3)`` clipped to at most 20 (mean about 8). Timestamps (Unix seconds) start at a
uniform day of 2021 and increase by ``60 + Exponential(1 day)`` per step. User ids are ``"u00001"``..; item ids
``"item00001"``... The split is :func:`~distillrec.data.dataset.leave_one_out` (last item = test, second-last =
valid), and ``dataset.protocol`` records ``{"split": "leave_one_out", "generator": "demo_shop", ...parameters}``.

So a first-order (item -> next item) model beats popularity clearly, and a model that also reads the earlier history
(the user's brands and colour) and the item content (category, brand, colour in text, one-hot features or images)
can do better still.

Determinism and caching
-----------------------
Only :class:`numpy.random.Generator` streams are used, spawned from ``numpy.random.SeedSequence(seed)`` (catalogue,
sequences) and ``SeedSequence([seed, item])`` per image, so the same parameters give byte-identical sequences and
identical images on every run; the sequences do not depend on ``image_size`` or ``write_images``. Only the images
touch the disk: by default under ``$DISTILLREC_CACHE_DIR`` (else ``$XDG_CACHE_HOME/distillrec``, else
``~/.cache/distillrec``) in ``demo-<hash of the image parameters>/``, written to a temporary folder and renamed into
place when complete, and reused when a complete folder (``manifest.json`` with matching parameters) is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import DataError, Dataset, ItemTable, LoadReport, leave_one_out
from .loaders import known_dataset, register_loader

GENERATOR = "demo_shop"
GENERATOR_VERSION = 1

DEPARTMENTS: dict[str, list[str]] = {
    "footwear": ["shoes", "socks", "laces"],
    "photo": ["cameras", "lenses", "tripods"],
    "kitchen": ["kettles", "mugs", "teapots"],
    "cycling": ["bicycles", "helmets", "bottles"],
}
CATEGORIES: list[str] = [c for cats in DEPARTMENTS.values() for c in cats]

# category -> complement categories (directional; the next item of branch (a) is drawn from one of these)
COMPLEMENTS: dict[str, list[str]] = {
    "shoes": ["socks", "laces"],
    "socks": ["shoes", "laces"],
    "laces": ["shoes"],
    "cameras": ["lenses", "tripods"],
    "lenses": ["cameras", "tripods"],
    "tripods": ["cameras"],
    "kettles": ["mugs", "teapots"],
    "mugs": ["teapots"],
    "teapots": ["mugs", "kettles"],
    "bicycles": ["helmets", "bottles"],
    "helmets": ["bicycles", "bottles"],
    "bottles": ["bicycles", "shoes"],
}

_NOUNS = {
    "shoes": "running shoes", "socks": "socks", "laces": "shoelaces", "cameras": "camera", "lenses": "lens",
    "tripods": "tripod", "kettles": "kettle", "mugs": "mug", "teapots": "teapot", "bicycles": "bicycle",
    "helmets": "helmet", "bottles": "water bottle",
}
_PAIRS = {"shoes", "socks", "laces"}
_FEATURES = {
    "shoes": ["a breathable mesh upper", "a cushioned foam sole", "a grippy rubber outsole", "a padded heel collar"],
    "socks": ["a merino wool blend", "a reinforced heel and toe", "an arch support band", "a seamless toe"],
    "laces": ["waxed cotton", "flat braided polyester", "round reflective strands", "metal aglets"],
    "cameras": ["a 24-megapixel sensor", "in-body stabilisation", "a weather-sealed body", "a tilting screen"],
    "lenses": ["a fast f/1.8 aperture", "a quiet autofocus motor", "a 24-70 mm zoom range", "low-dispersion glass"],
    "tripods": ["carbon-fibre legs", "a ball head", "a quick-release plate", "a travel-folding design"],
    "kettles": ["a 1.7 litre capacity", "a stainless steel body", "variable temperature control", "a rapid boil"],
    "mugs": ["glazed stoneware", "a 350 ml capacity", "a double wall", "a comfortable handle"],
    "teapots": ["a removable infuser", "cast-iron walls", "a drip-free spout", "a 1 litre capacity"],
    "bicycles": ["an aluminium frame", "hydraulic disc brakes", "a 10-speed drivetrain", "puncture-resistant tyres"],
    "helmets": ["MIPS protection", "12 air vents", "an adjustable dial fit", "a removable visor"],
    "bottles": ["a leak-proof cap", "insulated steel walls", "a 750 ml capacity", "a soft squeeze body"],
}
_USES = {
    "footwear": "Made for daily runs and long walks.",
    "photo": "Built for travel and street photography.",
    "kitchen": "Designed for a slow morning cup.",
    "cycling": "Ready for commutes and weekend rides.",
}

BRANDS: list[str] = [
    "Alder", "Brisa", "Corvo", "Dunmore", "Elka", "Fenwick", "Garda", "Halvo", "Istra", "Juno",
    "Kestrel", "Lumen", "Marlow", "Norra", "Orbis", "Pelle", "Quill", "Rhea", "Solvik", "Tamsin",
    "Umbra", "Vela", "Wexley", "Xylo", "Yarrow", "Zephyr", "Arden", "Bexley", "Calder", "Dovre",
]
_MODELS = [
    "Trail", "Metro", "Summit", "Drift", "Nova", "Pulse", "Atlas", "Echo", "Vista", "Ridge", "Aero", "Orbit",
    "Prime", "Zen", "Flux", "Haven", "Nimbus", "Terra", "Vector", "Apex", "Breeze", "Comet", "Delta", "Ember",
]

# name -> (RGB, sampling weight)
COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "red": ((200, 30, 35), 1.0),
    "orange": ((240, 130, 20), 0.7),
    "yellow": ((240, 210, 40), 0.7),
    "green": ((40, 150, 60), 0.9),
    "blue": ((35, 80, 200), 1.1),
    "purple": ((120, 50, 160), 0.6),
    "pink": ((235, 120, 170), 0.6),
    "brown": ((120, 75, 40), 0.8),
    "black": ((30, 30, 30), 1.5),
    "white": ((248, 248, 248), 1.2),
}
COLOUR_NAMES: list[str] = list(COLOURS)

# the transition process (see the module docstring)
P_COMPLEMENT, P_SAME_CATEGORY, P_POPULAR = 0.60, 0.15, 0.25
ZIPF_EXPONENT = 1.0
POP_SOFTEN = 0.5
USER_BRANDS = 3
BOOST_USER_BRAND, BOOST_USER_COLOUR, BOOST_SAME_BRAND, BOOST_SAME_COLOUR = 6.0, 4.0, 3.0, 2.0
MIN_LEN, MAX_LEN = 4, 20
P_MATCH = 0.7  # within branch (a): draw from the current item's "goes with" list rather than the whole category
MATCHES = 3  # items in each "goes with" list
MATCH_SAME_BRAND, MATCH_SAME_COLOUR = 4.0, 3.0  # how "goes with" lists favour the item's brand and colour


# ----------------------------------------------------------------------------------------------------------- catalogue
def _catalogue(n_items: int, seed: int) -> dict[str, Any]:
    """Item attributes (0-based arrays over items) and the brand -> categories map; depends only on (n_items, seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA7A]))
    n_cat = len(CATEGORIES)
    dept_of = {c: d for d, cats in DEPARTMENTS.items() for c in cats}
    depts = list(DEPARTMENTS)
    # brands: 2 categories of a home department (brands spread evenly over departments) + maybe one elsewhere
    brand_cats: list[list[int]] = []
    home = rng.permutation(np.arange(len(BRANDS)) % len(depts))
    for b in range(len(BRANDS)):
        own = DEPARTMENTS[depts[home[b]]]
        cats = [CATEGORIES.index(c) for c in rng.choice(own, size=2, replace=False)]
        if rng.random() < 0.25:
            other = [c for c in CATEGORIES if dept_of[c] != depts[home[b]]]
            cats.append(CATEGORIES.index(str(rng.choice(other))))
        brand_cats.append(sorted(cats))
    # every category gets at least 3 brands
    for c in range(n_cat):
        sellers = [b for b in range(len(BRANDS)) if c in brand_cats[b]]
        while len(sellers) < 3:
            b = int(rng.integers(len(BRANDS)))
            if b not in sellers:
                brand_cats[b] = sorted(brand_cats[b] + [c])
                sellers.append(b)
    sellers_of = [np.array([b for b in range(len(BRANDS)) if c in brand_cats[b]]) for c in range(n_cat)]

    category = rng.permutation(np.arange(n_items) % n_cat)
    brand = np.array([int(rng.choice(sellers_of[c])) for c in category], dtype=np.int64)
    cw = np.array([w for _, w in COLOURS.values()])
    colour = rng.choice(len(COLOURS), size=n_items, p=cw / cw.sum())
    model = rng.integers(len(_MODELS), size=n_items)
    feats = rng.integers(4, size=(n_items, 2))
    rank = rng.permutation(n_items) + 1
    pop = 1.0 / rank.astype(np.float64) ** ZIPF_EXPONENT
    # "goes with" lists: for each item and each of its complement categories, MATCHES fixed items of that category
    by_cat = [np.flatnonzero(category == c) for c in range(n_cat)]
    soft = pop**POP_SOFTEN
    matches: list[list[np.ndarray]] = []
    for i in range(n_items):
        per = []
        for comp in COMPLEMENTS[CATEGORIES[category[i]]]:
            cand = by_cat[CATEGORIES.index(comp)]
            w = soft[cand] * np.where(brand[cand] == brand[i], MATCH_SAME_BRAND, 1.0)
            w = w * np.where(colour[cand] == colour[i], MATCH_SAME_COLOUR, 1.0)
            k = min(MATCHES, len(cand))
            per.append(np.sort(rng.choice(cand, size=k, replace=False, p=w / w.sum())))
        matches.append(per)
    return {
        "category": category.astype(np.int64), "brand": brand, "colour": colour.astype(np.int64),
        "model": model, "feats": feats, "pop": pop, "brand_categories": brand_cats, "matches": matches,
    }


def _item_table(cat: dict[str, Any]) -> ItemTable:
    n = len(cat["category"])
    ids = [f"item{i + 1:05d}" for i in range(n)]
    title, desc, category, brand, colour = [], [], [], [], []
    dept_of = {c: d for d, cats in DEPARTMENTS.items() for c in cats}
    for i in range(n):
        c, b, k = CATEGORIES[cat["category"][i]], BRANDS[cat["brand"][i]], COLOUR_NAMES[cat["colour"][i]]
        f1, f2 = (_FEATURES[c][j] for j in cat["feats"][i])
        if f1 == f2:
            f2 = _FEATURES[c][(cat["feats"][i][1] + 1) % 4]
        title.append(f"{b} {_MODELS[cat['model'][i]]} {k} {_NOUNS[c]}")
        head = "A pair of" if c in _PAIRS else ("An" if k[0] in "aeiou" else "A")
        desc.append(f"{head} {k} {_NOUNS[c]} by {b} with {f1} and {f2}. {_USES[dept_of[c]]}")
        category.append(c)
        brand.append(b)
        colour.append(k)
    table = ItemTable(ids=ids, text={"title": title, "description": desc, "category": category, "brand": brand,
                                     "colour": colour})
    onehot = np.zeros((n, len(CATEGORIES) + len(BRANDS) + len(COLOURS)), dtype=np.float32)
    rows = np.arange(n)
    onehot[rows, cat["category"]] = 1.0
    onehot[rows, len(CATEGORIES) + cat["brand"]] = 1.0
    onehot[rows, len(CATEGORIES) + len(BRANDS) + cat["colour"]] = 1.0
    table.add_features("attributes_onehot", onehot, source="demo")
    return table


# ----------------------------------------------------------------------------------------------------------- sequences
def _draw(rng: np.random.Generator, weights: np.ndarray) -> int:
    cum = np.cumsum(weights)
    return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(weights) - 1)


def _sequences(cat: dict[str, Any], n_users: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """0-based item sequences and timestamps from the transition process in the module docstring."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E0]))
    category, brand, colour, pop, matches = cat["category"], cat["brand"], cat["colour"], cat["pop"], cat["matches"]
    by_cat = [np.flatnonzero(category == c) for c in range(len(CATEGORIES))]
    comp = [np.array([CATEGORIES.index(x) for x in COMPLEMENTS[c]]) for c in CATEGORIES]
    soft = pop ** POP_SOFTEN
    pop_cum = np.cumsum(pop)
    seqs, stamps = [], []
    start0 = 1_609_459_200  # 2021-01-01 UTC
    for _ in range(n_users):
        ubrands = rng.choice(len(BRANDS), size=USER_BRANDS, replace=False)
        ucolour = int(rng.choice(len(COLOURS)))
        w_user = soft * np.where(np.isin(brand, ubrands), BOOST_USER_BRAND, 1.0)
        w_user = w_user * np.where(colour == ucolour, BOOST_USER_COLOUR, 1.0)
        length = min(MAX_LEN, MIN_LEN + int(rng.negative_binomial(2, 1 / 3)))
        seq = np.empty(length, dtype=np.int64)
        cur = _draw(rng, w_user)
        seq[0] = cur
        for t in range(1, length):
            u = rng.random()
            if u < P_COMPLEMENT + P_SAME_CATEGORY:
                if u < P_COMPLEMENT:
                    k = int(rng.integers(len(comp[category[cur]])))
                    if rng.random() < P_MATCH:
                        cand = matches[cur][k]
                    else:
                        cand = by_cat[int(comp[category[cur]][k])]
                else:
                    cand = by_cat[category[cur]]
                    cand = cand[cand != cur]
                w = w_user[cand] * np.where(brand[cand] == brand[cur], BOOST_SAME_BRAND, 1.0)
                w = w * np.where(colour[cand] == colour[cur], BOOST_SAME_COLOUR, 1.0)
                cur = int(cand[_draw(rng, w)])
            else:
                cur = min(int(np.searchsorted(pop_cum, rng.random() * pop_cum[-1], side="right")), len(pop) - 1)
            seq[t] = cur
        seqs.append(seq)
        gaps = 60 + np.floor(rng.exponential(86_400.0, size=length - 1)).astype(np.int64)
        start = start0 + int(rng.integers(365)) * 86_400 + int(rng.integers(86_400))
        stamps.append(start + np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64))
    return seqs, stamps


# -------------------------------------------------------------------------------------------------------------- images
def _polygon(cx: float, cy: float, s: float, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(cx + s * x, cy + s * y) for x, y in pts]


def _box(cx: float, cy: float, s: float, x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [cx + s * x0, cy + s * y0, cx + s * x1, cy + s * y1]


def _draw_item(category: str, rgb: tuple[int, int, int], size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    bg = int(rng.integers(192, 209))
    fill = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in rgb)
    edge = tuple(int(v * 0.55) for v in fill)
    dark = (60, 60, 64)
    cx = size / 2 + rng.uniform(-0.06, 0.06) * size
    cy = size / 2 + rng.uniform(-0.06, 0.06) * size
    s = rng.uniform(0.30, 0.38) * size
    lw = max(1, round(s * 0.18))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    P = lambda pts: _polygon(cx, cy, s, pts)  # noqa: E731
    B = lambda *xy: _box(cx, cy, s, *xy)  # noqa: E731
    if category == "shoes":
        d.polygon(P([(-1, 0.1), (-0.15, 0.1), (0.25, -0.55), (0.65, -0.55), (1, 0.25), (1, 0.6), (-1, 0.6)]),
                  fill=fill, outline=edge)
        d.rectangle(B(-1, 0.6, 1, 0.8), fill=dark)
    elif category == "socks":
        d.polygon(P([(-0.35, -1), (0.35, -1), (0.35, 0.3), (0.95, 0.3), (0.95, 0.95), (-0.35, 0.95)]),
                  fill=fill, outline=edge)
        d.rectangle(B(-0.35, -1, 0.35, -0.8), fill=edge)
    elif category == "laces":
        pts = P([(-1, -0.8), (-0.5, 0.8), (0, -0.8), (0.5, 0.8), (1, -0.8)])
        d.line(pts, fill=fill, width=lw)
    elif category == "cameras":
        d.rectangle(B(-1, -0.45, 1, 0.75), fill=fill, outline=edge)
        d.rectangle(B(-0.6, -0.7, -0.1, -0.45), fill=fill, outline=edge)
        d.ellipse(B(-0.42, -0.27, 0.42, 0.57), fill=dark)
    elif category == "lenses":
        d.ellipse(B(-1, -1, 1, 1), fill=fill, outline=edge)
        d.ellipse(B(-0.5, -0.5, 0.5, 0.5), fill=dark)
    elif category == "tripods":
        d.polygon(P([(0, -0.8), (-0.9, 1), (-0.55, 1), (0, 0.1), (0.55, 1), (0.9, 1)]), fill=fill, outline=edge)
        d.rectangle(B(-0.35, -1, 0.35, -0.75), fill=dark)
    elif category == "kettles":
        d.polygon(P([(-0.55, -0.6), (0.55, -0.6), (0.85, 0.9), (-0.85, 0.9)]), fill=fill, outline=edge)
        d.polygon(P([(0.65, 0.1), (1.05, -0.35), (1.05, -0.2), (0.75, 0.4)]), fill=fill, outline=edge)
        d.rectangle(B(-0.25, -0.8, 0.25, -0.6), fill=dark)
    elif category == "mugs":
        d.ellipse(B(0.3, -0.45, 1.0, 0.45), outline=fill, width=lw)
        d.rectangle(B(-0.8, -0.8, 0.5, 0.8), fill=fill, outline=edge)
    elif category == "teapots":
        d.ellipse(B(-0.8, -0.5, 0.8, 0.9), fill=fill, outline=edge)
        d.polygon(P([(0.6, 0.2), (1.05, -0.3), (1.05, -0.15), (0.7, 0.5)]), fill=fill, outline=edge)
        d.ellipse(B(-0.3, -0.75, 0.3, -0.4), fill=edge)
    elif category == "bicycles":
        d.ellipse(B(-1, 0, -0.2, 0.8), outline=dark, width=max(1, lw // 2))
        d.ellipse(B(0.2, 0, 1, 0.8), outline=dark, width=max(1, lw // 2))
        d.line(P([(-0.6, 0.4), (-0.1, -0.35), (0.6, 0.4), (-0.6, 0.4)]), fill=fill, width=lw)
        d.line(P([(-0.1, -0.35), (0.45, -0.35)]), fill=fill, width=lw)
    elif category == "helmets":
        d.chord(B(-1, -0.8, 1, 1.0), 180, 360, fill=fill, outline=edge)
        d.rectangle(B(-1, 0.1, 1, 0.25), fill=edge)
    elif category == "bottles":
        d.rectangle(B(-0.4, -0.5, 0.4, 1), fill=fill, outline=edge)
        d.rectangle(B(-0.18, -0.85, 0.18, -0.5), fill=fill, outline=edge)
        d.rectangle(B(-0.22, -1, 0.22, -0.85), fill=dark)
    else:  # pragma: no cover - every category has a shape
        raise ValueError(category)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _image_params(n_items: int, seed: int, image_size: int) -> dict[str, Any]:
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "n_items": n_items, "seed": seed,
            "image_size": image_size}


def default_cache_dir(n_items: int = 1500, seed: int = 0, image_size: int = 64) -> Path:
    """Where :func:`make_demo_shop` keeps the images for these parameters when no ``out_dir`` is given."""
    root = os.environ.get("DISTILLREC_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "distillrec"
    key = json.dumps(_image_params(n_items, seed, image_size), sort_keys=True).encode()
    return base / f"demo-{hashlib.sha256(key).hexdigest()[:10]}"


def _image_names(n_items: int) -> list[str]:
    return [f"item{i + 1:05d}.png" for i in range(n_items)]


def _is_complete(folder: Path, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params or not manifest.get("complete"):
        return False
    return all((folder / "images" / name).is_file() for name in _image_names(params["n_items"]))


def _write_images(folder: Path, cat: dict[str, Any], seed: int, image_size: int) -> None:
    """Write all images + manifest to ``folder`` atomically (a temporary sibling renamed into place)."""
    n = len(cat["category"])
    params = _image_params(n, seed, image_size)
    if _is_complete(folder, params):
        return
    if folder.exists() and any(folder.iterdir()):
        if not (folder / "manifest.json").exists():
            raise DataError(
                f"demo: output folder '{folder}' exists, is not empty and is not a demo-shop folder; "
                "give an empty or new out_dir"
            )
        shutil.rmtree(folder)  # an earlier demo folder with other parameters or an incomplete write
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / "images").mkdir()
        for i, name in enumerate(_image_names(n)):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A6E, i]))
            rgb = COLOURS[COLOUR_NAMES[cat["colour"][i]]][0]
            _draw_item(CATEGORIES[cat["category"][i]], rgb, image_size, rng).save(tmp / "images" / name)
        manifest = {"params": params, "complete": True, "n_images": n,
                    "note": "generated by distillrec.data.synthetic.make_demo_shop; safe to delete"}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            if folder.exists():
                folder.rmdir()  # empty folder: replace it
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder, params):  # not someone else finishing the same folder first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------- API
def make_demo_shop(
    out_dir: Path | str | None = None,
    *,
    n_items: int = 1500,
    n_users: int = 3000,
    seed: int = 0,
    image_size: int = 64,
    write_images: bool = True,
) -> Dataset:
    """The demo shop as a leave-one-out :class:`Dataset` (see the module docstring for the generating process).

    ``out_dir`` holds the item images (default: :func:`default_cache_dir`); a complete folder from an earlier call
    with the same ``(n_items, seed, image_size)`` is reused. With ``write_images=False`` nothing touches the disk and
    ``items.image_paths`` is None.
    """
    n_items, n_users, seed, image_size = int(n_items), int(n_users), int(seed), int(image_size)
    if n_items < 2 * len(CATEGORIES):
        raise DataError(f"demo: n_items must be at least {2 * len(CATEGORIES)} (2 per category), got {n_items}")
    if n_users < 1:
        raise DataError(f"demo: n_users must be at least 1, got {n_users}")
    if write_images and not 16 <= image_size <= 1024:
        raise DataError(f"demo: image_size must be between 16 and 1024 pixels, got {image_size}")
    cat = _catalogue(n_items, seed)
    items = _item_table(cat)
    if write_images:
        folder = Path(out_dir) if out_dir is not None else default_cache_dir(n_items, seed, image_size)
        _write_images(folder, cat, seed, image_size)
        items.image_paths = [str((folder / "images" / name).resolve()) for name in _image_names(n_items)]
    seqs, stamps = _sequences(cat, n_users, seed)
    users = [f"u{u + 1:05d}" for u in range(n_users)]
    protocol = {
        "split": "leave_one_out", "generator": GENERATOR, "generator_version": GENERATOR_VERSION,
        "n_items": n_items, "n_users": n_users, "seed": seed, "image_size": image_size,
    }
    return leave_one_out("demo", items, [s + 1 for s in seqs], users, timestamps=stamps, protocol=protocol,
                         report=LoadReport())


@register_loader("demo")
def load_demo(path: Path | str | None = None, **options: Any) -> Dataset:
    """Loader for format ``"demo"``: ``options`` are :func:`make_demo_shop`'s; a path (if any) is its ``out_dir``."""
    allowed = {"out_dir", "n_items", "n_users", "seed", "image_size", "write_images"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"demo: unknown option(s) {', '.join(unknown)}; options: {', '.join(sorted(allowed))}")
    if path is not None:
        options.setdefault("out_dir", path)
    return make_demo_shop(**options)


known_dataset("demo", "demo", None)


def write_planted_transitions(root: str | Path, n: int = 40, users: int = 300, length: int = 6, seed: int = 0) -> Path:
    """An S3-Rec-format catalogue (``Toy.txt``, ``toy_item_meta.tsv``, ``Toy_item2attributes.json``) whose sessions
    walk one hidden cycle through all ``n`` items: the next item is fixed by the cycle and unrelated to the item's text
    (random words) or its "image" (a random one-hot attribute). A transition probe of the raw features is at chance
    on it; a representation that learnt the transitions is not (tests/test_tpad.py, benchmarks/tpad_planted.py)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    perm = rng.permutation(np.arange(1, n + 1))
    nxt = {int(a): int(b) for a, b in zip(perm, np.roll(perm, -1))}
    lines = []
    for u in range(1, users + 1):
        i = int(rng.integers(1, n + 1))
        seq = [i]
        for _ in range(length - 1):
            i = nxt[i]
            seq.append(i)
        lines.append(" ".join(map(str, [u, *seq])))
    (root / "Toy.txt").write_text("\n".join(lines) + "\n")
    words = "amber basil cedar delta ember fjord gamma heron indigo jasper koala lemon maple nectar onyx".split()
    meta = ["item_id\tidgen_textual_id"] + [f"{k}\t{rng.choice(words)} {rng.choice(words)} {k}" for k in range(1, n + 1)]
    (root / "toy_item_meta.tsv").write_text("\n".join(meta) + "\n")
    (root / "Toy_item2attributes.json").write_text(json.dumps({str(k): [int(rng.integers(1, 9))]
                                                               for k in range(1, n + 1)}))
    return root
