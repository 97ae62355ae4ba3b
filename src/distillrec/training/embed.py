"""Embed every item of a dataset once with the :class:`~distillrec.llm.multimodal.MultimodalLM` (``distillrec embed``).

Output (``out_dir``)::

    item_embeddings.safetensors   tensors "image" and "text", float32 [n_items + 1, d]; row 0 = padding (zeros),
                                  row i = internal item i; metadata "distillrec" = JSON (config hash, model, adapter,
                                  dims, dataset, ...)
    item_ids.json                 JSON list: position i = external id of internal item i (position 0 = null)
    embed_config.yaml             the resolved configuration
    shards/shard-NNNNN.safetensors  the resumable work units (kept unless keep_shards: false)

How the work is done:

* Items are sorted by prompt length in tokens, longest first (ties by item index), so a batch size that does not fit
  in memory fails in the first seconds, not after an hour. The sorted order is cut into shards of ``shard_size``
  items and each shard into batches of ``batch_size``.
* Each shard is written on its own (tensors ``image``, ``text`` and ``items``, the internal ids of its rows),
  atomically: a temporary file in the same folder, then ``os.replace``. A killed run leaves only finished shards, and
  a rerun skips every shard whose metadata matches the current config hash and item list. ``batch_size`` is not part
  of the hash, so a run that ran out of memory can resume with a smaller batch.
* Under ``torchrun --nproc_per_node N``, rank ``r`` computes shards ``r, r + N, ...``; after a barrier rank 0 merges
  all shards into ``item_embeddings.safetensors`` (atomically). Shard contents do not depend on N, so the result is
  the single-process one.
* Every rank builds the same model: ``lm.seed`` seeds the tiny test model and every randomly initialised trainable
  part (connector, ``missing_image``; LoRA B matrices start at zero, so an untrained adapter equals ``"base"``).

Config keys (YAML; unknown keys are errors that name them): ``dataset`` (as in run configs), ``lm`` (``name``:
``smollm2-135m-instruct`` / a Hugging Face id or local folder / ``tiny`` for tests; ``dtype``; ``seed``;
``cache_dir``; ``attn_implementation``), ``multimodal`` (:class:`MultimodalLMConfig` fields; ``base`` and
``dtype`` there are taken from ``lm``; ``d_image`` defaults to the width of ``image_features``), ``pretrained``
(a folder written by ``MultimodalLM.save_trainable``: connector, summary tokens and LoRA adapters are loaded from it
and ``multimodal`` must be left out), ``adapter`` (``knowledge`` by default; ``base`` = LoRA disabled),
``image_features`` (the name of an item feature matrix of the dataset, e.g. ``image_clip``; all-zero rows count as
"no image"; ``image_effnet_lite0`` is computed with the bundled encoder when the dataset has image paths; ``null`` =
no image input, every item gets the learned "missing image" token), ``text_fields`` (null = all, joined by ". "; [] = no text),
``batch_size``, ``shard_size``, ``out`` (default folder; ``--out`` wins), ``keep_shards``, and the shared settings
``num_threads``, ``device``,
``progress``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import Field

from ..config import RuntimeSettings, read_config
from ..data.embeddings import EMBEDDINGS_FILE, IDS_FILE
from ..data.item_text import item_texts
from ..data.loaders import DatasetConfig, load_dataset
from ..errors import ConfigError
from ..features.cache import item_feature_matrix
from ..files import META_KEY, atomic_save_tensors, atomic_write_text, folder_fingerprint
from ..llm.builder import LMSpec, build_multimodal, check_adapter, multimodal_config, pretrained_config, \
    resolve_device
from ..llm.multimodal import MultimodalLM, MultimodalLMConfig

FORMAT = 1


class EmbedConfig(RuntimeSettings):
    """Configuration of ``distillrec embed`` (see the module docstring); ``num_threads``, ``device`` and ``progress``
    are the settings every job shares."""

    dataset: DatasetConfig
    lm: LMSpec = Field(default_factory=LMSpec)
    multimodal: MultimodalLMConfig = Field(default_factory=MultimodalLMConfig)
    pretrained: str | None = None
    adapter: str = "knowledge"
    image_features: str | None = None
    text_fields: list[str] | None = None
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(1024, ge=1)
    out: str | None = None  # default folder (--out wins)
    keep_shards: bool = True


def load_embed_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> EmbedConfig:
    """Read and validate an embed config (YAML file or dict) with ``--set key=value`` overrides."""
    cfg, name = read_config(source, overrides, EmbedConfig, "dataset, lm, multimodal, adapter, ...")
    if cfg.pretrained is not None and cfg.multimodal.model_fields_set:
        raise ConfigError(f"{name}: give either 'pretrained' (a saved MultimodalLM folder, whose config is used) or "
                          "'multimodal' fields, not both")
    return cfg


# ---------------------------------------------------------------------------------------------------- helpers
def _read_meta(path: Path) -> dict[str, Any] | None:
    """The JSON metadata of a file we wrote, or None when it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])
    except Exception:  # noqa: BLE001 - a corrupt or foreign file is simply not reused
        return None


def effective_multimodal_config(cfg: EmbedConfig, d_image: int | None) -> MultimodalLMConfig:
    """The MultimodalLMConfig the model is built with (``pretrained``'s own, or ``multimodal`` completed)."""
    if cfg.pretrained is not None:
        mm = pretrained_config(cfg.pretrained)
        if d_image is not None and mm.d_image != d_image:
            raise ConfigError(f"image_features '{cfg.image_features}' are {d_image}-d but the pretrained connector "
                              f"expects d_image={mm.d_image}")
        return mm
    if d_image is not None and "d_image" in cfg.multimodal.model_fields_set and cfg.multimodal.d_image != d_image:
        raise ConfigError(f"multimodal.d_image={cfg.multimodal.d_image} but image_features "
                          f"'{cfg.image_features}' are {d_image}-d; remove multimodal.d_image or fix it")
    return multimodal_config(cfg.lm, cfg.multimodal.model_dump(), **({} if d_image is None else {"d_image": d_image}))


def build_model(cfg: EmbedConfig, mm_cfg: MultimodalLMConfig) -> MultimodalLM:
    """The LM named by ``cfg.lm`` wrapped in a MultimodalLM (``pretrained`` parts loaded), in eval mode."""
    mm = build_multimodal(cfg.lm, mm_cfg, device=cfg.device, pretrained=cfg.pretrained)
    check_adapter(mm, cfg.adapter)
    return mm.eval()


def prompt_lengths(mm: MultimodalLM, texts: list[str], image_rows: np.ndarray | None) -> np.ndarray:
    """Approximate prompt length in tokens per item (item text, capped, plus its soft image tokens)."""
    tok = mm.tokenizer
    enc = tok([mm._clean(t) for t in texts], add_special_tokens=False)["input_ids"]
    n_text = np.minimum(np.array([len(x) for x in enc], dtype=np.int64), mm.config.max_text_tokens)
    n_soft = np.ones(len(texts), dtype=np.int64)
    if image_rows is not None:
        per = mm.config.n_query if mm.config.connector == "qformer" else 1
        n_soft = np.where(image_rows, per, 1)
    return n_text + n_soft


def _config_hash(cfg: EmbedConfig, mm_cfg: MultimodalLMConfig, ids: list[str], texts: list[str],
                 image: np.ndarray | None) -> str:
    """What the embeddings depend on (not batch_size, out, threads, device, progress)."""
    h = hashlib.sha256()
    spec = {
        "format": FORMAT,
        "dataset": cfg.dataset.model_dump(mode="json"),
        "lm": cfg.lm.model_dump(mode="json", exclude={"cache_dir"}),
        "multimodal": mm_cfg.model_dump(mode="json"),
        "pretrained": folder_fingerprint(cfg.pretrained) if cfg.pretrained else None,
        "adapter": cfg.adapter,
        "image_features": cfg.image_features,
        "text_fields": cfg.text_fields,
        "shard_size": cfg.shard_size,
    }
    h.update(json.dumps(spec, sort_keys=True).encode())
    for s in (*ids, "\0\0", *texts):
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    if image is not None:
        h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:20]


def shard_path(out_dir: Path, k: int) -> Path:
    return Path(out_dir) / "shards" / f"shard-{k:05d}.safetensors"


def _shard_done(path: Path, config_hash: str, items: np.ndarray) -> bool:
    meta = _read_meta(path)
    if meta is None or meta.get("config_hash") != config_hash or meta.get("n") != len(items):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return bool(np.array_equal(f.get_tensor("items").numpy(), items))
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------------------------------------------- the job
def embed_items(cfg: EmbedConfig, out_dir: str | Path) -> dict[str, Any]:
    """Embed every item of ``cfg.dataset`` into ``out_dir`` (see the module docstring). Returns a summary dict
    (``path``, ``n_items``, ``dims``, shard counts, ``seconds``, ``rank``, ``world_size``)."""
    from tqdm.auto import tqdm

    from .distributed import barrier, init_distributed

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    rank, world = init_distributed()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg.apply()

    ds = load_dataset(cfg.dataset)
    items = ds.items
    n = items.n_items
    texts = item_texts(items, cfg.text_fields)
    image = item_feature_matrix(cfg.image_features, items, cfg.progress)
    has_image = None if image is None else np.asarray(image[1:].any(-1))
    mm_cfg = effective_multimodal_config(cfg, None if image is None else int(image.shape[1]))
    config_hash = _config_hash(cfg, mm_cfg, items.ids, texts, image)

    merged = out_dir / EMBEDDINGS_FILE
    old = _read_meta(merged) if merged.exists() else None
    if old is not None and old.get("config_hash") == config_hash and (out_dir / IDS_FILE).exists():
        return {"path": str(merged), "n_items": n, "dims": old.get("dims"), "computed_shards": 0,
                "reused_shards": 0, "up_to_date": True, "seconds": round(time.perf_counter() - t0, 2),
                "rank": rank, "world_size": world}

    mm = build_model(cfg, mm_cfg)
    lengths = prompt_lengths(mm, texts, has_image)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties by item index
    shards = [order[s:s + cfg.shard_size] for s in range(0, n, cfg.shard_size)]
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)

    mine = list(range(rank, len(shards), world))
    todo = [k for k in mine if not _shard_done(shard_path(out_dir, k), config_hash, shards[k] + 1)]
    done_items = sum(len(shards[k]) for k in mine if k not in todo)
    feats_t = None if image is None else torch.from_numpy(image[1:])
    mask_t = None if has_image is None else torch.from_numpy(has_image)
    bar = tqdm(total=sum(len(shards[k]) for k in mine), initial=done_items, unit="item", desc="embed",
               disable=not cfg.progress or rank != 0, dynamic_ncols=True, file=sys.stderr)
    dims: dict[str, int] = {}
    with torch.inference_mode():
        for k in todo:
            idx = shards[k]
            parts: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
            for s in range(0, len(idx), cfg.batch_size):
                b = idx[s:s + cfg.batch_size]
                bt = torch.from_numpy(b)
                out = mm.embed([texts[i] for i in b],
                               image_features=None if feats_t is None else feats_t[bt],
                               image_mask=None if mask_t is None else mask_t[bt],
                               adapter=cfg.adapter)
                for key in parts:
                    parts[key].append(out[key].float().cpu())
                bar.update(len(b))
            tensors = {key: torch.cat(v) for key, v in parts.items()}
            tensors["items"] = torch.from_numpy(idx + 1)
            meta = {"config_hash": config_hash, "shard": k, "n_shards": len(shards), "n": len(idx)}
            atomic_save_tensors(shard_path(out_dir, k), tensors, {META_KEY: json.dumps(meta)})
    bar.close()
    barrier()

    result: dict[str, Any] = {"path": str(merged), "n_items": n, "computed_shards": len(todo),
                              "reused_shards": len(mine) - len(todo), "up_to_date": False, "rank": rank,
                              "world_size": world}
    if rank == 0:
        dims = _merge(cfg, mm_cfg, out_dir, shards, config_hash, items.ids, ds.name)
    barrier()
    if rank != 0:
        dims = (_read_meta(merged) or {}).get("dims", {})
    result["dims"] = dims
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _merge(cfg: EmbedConfig, mm_cfg: MultimodalLMConfig, out_dir: Path, shards: list[np.ndarray],
           config_hash: str, ids: list[str], dataset_name: str) -> dict[str, int]:
    from safetensors.torch import load_file

    n = len(ids)
    full: dict[str, torch.Tensor] = {}
    seen = np.zeros(n + 1, dtype=bool)
    for k, idx in enumerate(shards):
        path = shard_path(out_dir, k)
        if not _shard_done(path, config_hash, idx + 1):
            raise RuntimeError(f"shard {path} is missing or stale after all ranks finished")
        t = load_file(str(path))
        for key in ("image", "text"):
            if key not in full:
                full[key] = torch.zeros(n + 1, t[key].shape[1], dtype=torch.float32)
            full[key][t["items"]] = t[key]
        seen[t["items"].numpy()] = True
    if not seen[1:].all():
        raise RuntimeError(f"{int((~seen[1:]).sum())} items are in no shard")
    dims = {key: int(v.shape[1]) for key, v in full.items()}
    meta = {
        "format": FORMAT,
        "kind": "distillrec.item_embeddings",
        "config_hash": config_hash,
        "model": cfg.lm.name,
        "dtype": cfg.lm.dtype,
        "pretrained": cfg.pretrained,
        "adapter": cfg.adapter,
        "dims": dims,
        "n_items": n,
        "dataset": dataset_name,
        "image_features": cfg.image_features,
        "text_fields": cfg.text_fields,
        "connector": mm_cfg.connector,
        "rows": "row 0 = padding (zeros), row i = internal item i; external ids in item_ids.json",
    }
    atomic_write_text(out_dir / IDS_FILE, json.dumps([None, *ids]))
    atomic_write_text(out_dir / "embed_config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    atomic_save_tensors(out_dir / EMBEDDINGS_FILE, full, {META_KEY: json.dumps(meta)})
    for tmp in (out_dir / "shards").glob(".shard-*.tmp-*"):  # left by killed runs; every rank has finished
        tmp.unlink(missing_ok=True)
    if not cfg.keep_shards:
        for k in range(len(shards)):
            shard_path(out_dir, k).unlink(missing_ok=True)
    return dims


def load_item_embeddings(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], list[str | None], dict[str, Any]]:
    """``({"image": [n+1, d], "text": [n+1, d]}, ids (position i = external id of item i), metadata)``."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    path = out_dir / EMBEDDINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `distillrec embed CONFIG --out {out_dir}` first")
    return load_file(str(path)), json.loads((out_dir / IDS_FILE).read_text()), _read_meta(path) or {}
