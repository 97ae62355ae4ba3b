"""Features computed once: an on-disk safetensors cache keyed by encoder id + content hash, and ``encode_item_table``.

Location: ``$DISTILLREC_CACHE_DIR/features`` if that variable is set, else ``$XDG_CACHE_HOME/distillrec/features``,
else ``~/.cache/distillrec/features`` (the same root the demo shop uses for its images). One file per
``(encoder_id, content hash)``: ``<encoder slug>-<sha256(encoder_id, content hash)[:20]>.safetensors``, whose
metadata repeats both keys (checked on load). Files are written to a temporary file in the same folder and moved into
place with ``os.replace``, so a killed run or two concurrent runs never leave a half-written entry. A file that cannot
be read is treated as a miss and rewritten. Delete the folder to clear the cache.

Content hashes: texts by their exact strings (in order); images by path + size + mtime of each file (``"stat"``,
the default, cheap for 100k images) or by the SHA-256 of the bytes (``"bytes"``: same content at another path hits).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ..data.dataset import ItemTable
from ..files import atomic_write
from .image import ImageEncoder, ImageFeatures, REASONS
from .text import TextEncoder

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"


# the features the bundled encoders compute on demand: TextEncoder().feature_name, ImageEncoder().feature_name (tested)
DEFAULT_FEATURES = ("text_minilm", "image_effnet_lite0")


def default_cache_dir() -> Path:
    root = os.environ.get("DISTILLREC_CACHE_DIR")
    if root:
        return Path(root) / "features"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "distillrec" / "features"


# -------------------------------------------------------------------------------------------------- hashing
def hash_texts(texts: Sequence[str]) -> str:
    h = hashlib.sha256(b"texts\0")
    for t in texts:
        b = ("" if t is None else str(t)).encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def hash_images(paths: Sequence[str | os.PathLike | None], mode: Literal["stat", "bytes"] = "stat") -> str:
    """Hash of the image list: per entry its path and size + mtime (``stat``) or the SHA-256 of its bytes (``bytes``).

    An absent path hashes as absent, so the entry changes when the file appears."""
    if mode not in ("stat", "bytes"):
        raise ValueError(f"image hash mode must be 'stat' or 'bytes', got {mode!r}")
    h = hashlib.sha256(f"images-{mode}\0".encode())
    for p in paths:
        if p is None or str(p) == "":
            h.update(b"<none>\0")
            continue
        path = Path(p)
        try:
            if mode == "bytes":
                fh = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        fh.update(block)
                h.update(fh.digest())
            else:
                st = path.stat()
                h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"<absent>{os.path.abspath(path)}".encode())
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- cache
class FeatureCache:
    """A folder of safetensors files, one per ``(encoder_id, content_hash)``."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, encoder_id: str, content_hash: str) -> Path:
        key = hashlib.sha256(f"{FORMAT_VERSION}\0{encoder_id}\0{content_hash}".encode()).hexdigest()[:20]
        name = re.sub(r"[^A-Za-z0-9]+", "-", encoder_id.split("|")[1] if "|" in encoder_id else encoder_id)
        name = name.strip("-")[-48:].lstrip("-") or "features"
        return self.root / f"{name}-{key}.safetensors"

    def load(self, encoder_id: str, content_hash: str) -> dict[str, np.ndarray] | None:
        from safetensors import safe_open

        p = self.path(encoder_id, content_hash)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("encoder_id") != encoder_id or meta.get("content_hash") != content_hash:
                    log.warning("feature cache: %s holds other keys; recomputing", p)
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a truncated or foreign file: recompute and overwrite
            log.warning("feature cache: cannot read %s (%s); recomputing", p, e)
            return None

    def save(
        self, encoder_id: str, content_hash: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
    ) -> Path:
        from safetensors.numpy import save_file

        p = self.path(encoder_id, content_hash)
        p.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "encoder_id": encoder_id, "content_hash": content_hash, **(metadata or {})}
        return atomic_write(p, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                                      str(tmp), metadata=meta))


def _cache_of(cache: FeatureCache | str | os.PathLike | bool | None) -> FeatureCache | None:
    if cache is False:
        return None
    if cache is None or cache is True:
        return FeatureCache()
    if isinstance(cache, FeatureCache):
        return cache
    return FeatureCache(cache)


# ------------------------------------------------------------------------------------------ cached encoding
def encode_texts(
    encoder: TextEncoder,
    texts: Sequence[str],
    *,
    cache: FeatureCache | str | os.PathLike | bool | None = None,
    batch_size: int | None = None,
    show_progress: bool | None = None,
) -> np.ndarray:
    """``encoder.encode(texts)`` through the cache (``cache=False`` bypasses it; a path or FeatureCache picks one)."""
    texts = ["" if t is None else str(t) for t in texts]
    fc = _cache_of(cache)
    if fc is not None:
        eid, ch = encoder.encoder_id, hash_texts(texts)
        hit = fc.load(eid, ch)
        if hit is not None and "features" in hit and hit["features"].shape[0] == len(texts):
            return hit["features"].astype(np.float32, copy=False)
    feats = encoder.encode(texts, batch_size, show_progress=show_progress)
    if fc is not None:
        fc.save(eid, ch, {"features": feats}, {"n": str(len(texts)), "dim": str(feats.shape[1])})
    return feats


def encode_images(
    encoder: ImageEncoder,
    paths: Sequence[str | os.PathLike | None],
    *,
    cache: FeatureCache | str | os.PathLike | bool | None = None,
    hash_mode: Literal["stat", "bytes"] = "stat",
    batch_size: int | None = None,
    show_progress: bool | None = None,
) -> ImageFeatures:
    """``encoder.encode(paths)`` through the cache; the missing mask, counts and top-k labels are cached too."""
    paths = list(paths)
    fc = _cache_of(cache)
    if fc is not None:
        eid, ch = encoder.encoder_id, hash_images(paths, hash_mode)
        hit = fc.load(eid, ch)
        complete = hit is not None and {"features", "missing", "counts"} <= hit.keys()
        if complete and hit["features"].shape[0] == len(paths):
            c = hit["counts"].tolist()
            counts = {"ok": int(c[0]), **{r: int(v) for r, v in zip(REASONS, c[1:])}}
            missing = hit["missing"].astype(bool)
            problems = [(int(i), "" if paths[i] is None else str(paths[i]), "missing (cached)")
                        for i in np.flatnonzero(missing)[:20]]
            return ImageFeatures(hit["features"].astype(np.float32, copy=False), missing, counts, problems,
                                 hit.get("top_ids"), hit.get("top_probs"))
    r = encoder.encode(paths, batch_size, show_progress=show_progress)
    if fc is not None:
        t = {"features": r.features, "missing": r.missing,
             "counts": np.array([r.counts["ok"], *(r.counts[x] for x in REASONS)], np.int64)}
        if r.top_ids is not None:
            t["top_ids"], t["top_probs"] = r.top_ids, r.top_probs
        fc.save(eid, ch, t, {"n": str(len(paths)), "dim": str(r.features.shape[1]), "hash_mode": hash_mode})
    return r


# ------------------------------------------------------------------------------------------- item tables
@dataclass
class EncodeReport:
    """What :func:`encode_item_table` did: the feature names it added and the image outcome."""

    text_feature: str | None = None
    image_feature: str | None = None
    missing_images: int = 0
    image: ImageFeatures | None = None  # per-row mask, counts by reason, ImageNet top-k (rows are items 1..n)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"added {n}" for n in (self.text_feature, self.image_feature) if n]
        if self.image is not None:
            parts.append(self.image.summary())
        return "; ".join(parts + self.notes) or "nothing encoded"


def encode_item_table(
    items: ItemTable,
    text_fields: Sequence[str] | None = None,
    image: bool = True,
    *,
    text: bool = True,
    text_encoder: TextEncoder | str | None = None,
    image_encoder: ImageEncoder | str | None = None,
    cache: FeatureCache | str | os.PathLike | bool | None = None,
    hash_mode: Literal["stat", "bytes"] = "stat",
    batch_size: int | None = None,
    show_progress: bool | None = None,
    text_name: str | None = None,
    image_name: str | None = None,
) -> EncodeReport:
    """Encode the items' text and images with frozen encoders and attach them with ``items.add_features``.

    Text: ``items.item_text(i, text_fields)`` (all text fields joined by ". " when ``text_fields`` is None) through
    ``text_encoder`` (default: bundled MiniLM) -> feature ``text_minilm`` (``text_<model>`` for other models).
    Images (when ``image`` and the table has image paths): ``image_encoder`` (default: bundled EfficientNet-Lite0)
    -> ``image_effnet_lite0``. Row 0 (padding) is zeros; so are rows of missing images, whose mask is in
    ``report.image.missing`` (and recoverable as all-zero rows: :func:`~distillrec.features.image.missing_rows`).
    Both go through the on-disk cache, so a second call loads instead of running the encoders.
    """
    report = EncodeReport()
    if text:
        if not items.text:
            report.notes.append("no text fields: text not encoded")
        else:
            fields = list(text_fields) if text_fields else None
            unknown = [f for f in (fields or []) if f not in items.text]
            if unknown:
                raise ValueError(f"encode_item_table: unknown text fields {unknown}; the table has {list(items.text)}")
            enc = text_encoder if isinstance(text_encoder, TextEncoder) else TextEncoder(text_encoder or "minilm")
            strings = [items.item_text(i, fields) for i in range(1, items.n_items + 1)]
            feats = encode_texts(enc, strings, cache=cache, batch_size=batch_size, show_progress=show_progress)
            report.text_feature = text_name or enc.feature_name
            items.add_features(report.text_feature, feats, source=f"text encoder {enc.model_name}")
    if image:
        if not items.image_paths:
            report.notes.append("no image paths: images not encoded")
        else:
            enc_i = image_encoder if isinstance(image_encoder, ImageEncoder) else ImageEncoder(
                image_encoder or "efficientnet-lite0")
            r = encode_images(enc_i, items.image_paths, cache=cache, hash_mode=hash_mode, batch_size=batch_size,
                              show_progress=show_progress)
            report.image_feature = image_name or enc_i.feature_name
            items.add_features(report.image_feature, r.features, source=f"image encoder {enc_i.model_name}")
            report.image, report.missing_images = r, r.n_missing
    return report


def encode_missing_features(
    items: ItemTable, names: Sequence[str], text_fields: Sequence[str] | None = None, show_progress: bool | None = None
) -> list[str]:
    """Compute the default encoders' features that ``names`` asks for and the table lacks: ``text_minilm`` (bundled
    MiniLM over ``text_fields``, all fields when None) and ``image_effnet_lite0`` (bundled EfficientNet-Lite0, when
    the table has image paths). Other missing names are left for the caller's error. Returns the names it added;
    both go through the on-disk cache, so naming them in a config costs the encoder once per machine."""
    missing = [n for n in names if n not in items.features]
    want_text = TextEncoder().feature_name in missing and bool(items.text)
    want_image = ImageEncoder().feature_name in missing and bool(items.image_paths)
    if not (want_text or want_image):
        return []
    rep = encode_item_table(items, text_fields, image=want_image, text=want_text, show_progress=show_progress)
    return [n for n in (rep.text_feature, rep.image_feature) if n]


def item_feature_matrix(name: str | None, items: ItemTable, progress: bool = True, key: str = "image_features",
                        text_fields: Sequence[str] | None = None) -> np.ndarray | None:
    """The item feature matrix ``name`` (float32 ``[n_items + 1, d]``); the bundled encoders' features
    (``image_effnet_lite0`` for datasets with image paths, ``text_minilm``) are computed and cached when absent.
    ``None`` -> ``None`` (no input); ``text_fields``: the fields MiniLM reads (None: all). Any other missing name is a ConfigError naming ``key`` and the features there are."""
    from ..errors import ConfigError

    if name is None:
        return None
    if name not in items.features and not encode_missing_features(items, [name], text_fields, progress):
        have = ", ".join(sorted(items.features)) or "none"
        default = ImageEncoder().feature_name
        hint = f"; '{default}' is computed when the dataset has image paths" if not items.image_paths else ""
        raise ConfigError(f"{key}: the dataset has no feature matrix '{name}' (it has: {have}){hint}")
    return np.asarray(items.features[name], dtype=np.float32)
