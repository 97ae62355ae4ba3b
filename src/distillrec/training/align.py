"""Connector alignment pretraining (LLaVA stage 1): image features -> the item's text, with the LM frozen.

``pretrain_connector(cfg)`` trains only the visual connector of a :class:`~distillrec.llm.multimodal.MultimodalLM`
(plus its learned "missing image" token when items without image are kept) so that, from the soft image tokens
alone, the frozen LM generates the item's text. The LM is built without LoRA (``adapters=[]``) and every LM weight,
including the embedding matrix, stays frozen; the ``<IMG_SUM>``/``<TEXT_SUM>`` embeddings are not in the caption
prompt and are excluded from the optimiser.

Task
----
Prompt (user turn, inside the chat template when the tokenizer has one): ``cfg.prompt``, default
``"<image> Describe this product."``, where ``<image>`` is replaced by the connector's soft tokens. Answer: the item's
target text, ``cfg.target_template`` formatted with the item's text fields (e.g. ``"{colour} {category} by {brand}"``
on the demo shop, ``"{categories}. {title}"`` on amazon2018-scientific-mm), cut to ``max_answer_tokens`` tokens.
Loss: :meth:`MultimodalLM.lm_loss`, cross-entropy on the answer tokens (+ eos) only.

Items whose table has a single ``text`` field in the RecBole/UniSRec form ``"title. categories. brand."`` (as
amazon2018-scientific-mm) also get the parsed fields ``title``, ``categories`` and ``brand``
(:func:`split_item_text`: the last ``". "``-separated piece is the brand, the one before it the category path, the rest
the title).

Split: the items are shuffled with ``seed``; the first ``n_heldout = min(max_heldout, round(heldout_frac * n))`` are
held out for evaluation, the next ``max_items`` are the training items (items without an image feature are dropped
first when ``missing_images="skip"``, the default). Nothing of the held-out items is trained on.

Evaluation (on the held-out items, BEFORE training with the freshly initialised connector and AFTER training)
-----------------------------------------------------------------------------------------------------------------
* ``caption_loss``: answer-token cross-entropy, averaged over all held-out answer tokens (eos included), and its
  ``exp`` (perplexity).
* ``keyword_recall``: greedy generation (``max_new_tokens``) from the prompt with the image soft tokens as the only
  item-specific input; an item is a hit when the generated text contains at least one of the item's *category words*.
  Recall = hits / number of held-out items that have at least one category word.
* Category words of an item: the words of its ``keyword_fields`` (demo shop: ``category``, ``colour``, ``brand``;
  amazon2018-scientific-mm: ``categories``, the category path), lower-cased, split into ``[a-z0-9]+`` runs, a
  trailing plural ``s`` removed from words longer than 3 letters (not ``ss``), English stop words (and the generic
  "product", "item") and pure numbers removed, and words that are in more than ``max_keyword_df`` (default 0.5) of
  all items' word sets removed (on scientific-mm every path starts with "Industrial & Scientific", which would make
  every generation a hit; its recipe also strips that root from the text with ``strip_prefixes``). The generated text
  is normalised the same way.
* ``chance`` (the chance level, one definition used everywhere): the same recall when each item's generation is
  scored against *another* held-out item's category words, averaged exactly over all other items:
  ``chance = mean_i mean_{j != i} 1[words(gen_i) & kw_j != {}]`` over the held-out items with category words. It is
  the recall a generation would get that ignores the image but is otherwise the same text (generic words, the most
  common categories). ``p_value`` is a one-sided permutation test: the fraction (add-one smoothed) of 1000 random
  n-cycles sigma (permutations without a fixed point) whose recall ``mean_i 1[words(gen_i) & kw_sigma(i) != {}]``
  is at least the observed recall.

Checkpoints and resume
----------------------
After each epoch the trainable state is written to ``<out>/checkpoints/epoch-NNN``: ``MultimodalLM.save_trainable``
output + ``optimizer.safetensors`` + ``state.json`` (epoch, step, losses, torch RNG state), all into a temporary
folder renamed into place, so a kill leaves complete checkpoints only. A new call with the same config and ``out``
resumes from the newest complete checkpoint (``epochs`` may be raised to train longer: the learning-rate schedule
is then that of the new length from the resumed step on) and, seeded, ends with the
same connector weights as an uninterrupted run (the batch order of epoch ``e`` depends only on ``(seed, e)``; the
learning rate only on the global step). The BEFORE numbers are computed once and kept in ``<out>/before.json``.

Outputs in ``out``: ``config.json``, ``before.json``, ``checkpoints/``, ``connector/`` (the final trainable state,
loadable with ``MultimodalLM.from_pretrained``/``load_trainable``), ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data.dataset import Dataset
from ..data.item_text import STOP_WORDS, item_fields, keyword_sets, split_item_text, words  # noqa: F401
from ..data.loaders import DatasetConfig, load_dataset
from ..llm.multimodal import IMAGE_TOKEN, MultimodalLM, MultimodalLMConfig
from .checkpoint import write_folder_atomically

REPORT_FORMAT = 1
_CKPT_RE = re.compile(r"^epoch-(\d{3,})$")
_RESERVED_CONNECTOR_KEYS = {"d_image", "adapters", "base", "dtype"}


class AlignmentConfig(BaseModel):
    """Configuration of :func:`pretrain_connector` (YAML recipes: ``configs/align/*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetConfig
    image_feature: str = "effnet"  # a feature name of the item table ("image_clip", "attributes_onehot") or "effnet"
    image_encoder: str = "efficientnet-lite0"  # used when image_feature == "effnet" (the demo shop's PNG images)
    lm: str = "smollm2-135m-instruct"  # "tiny" (random 2-layer Llama, tests), the bundled SmolLM2, any HF id / path
    dtype: str = "float32"
    device: str = "cpu"  # "cpu", "cuda", "auto"
    connector: dict[str, Any] = Field(default_factory=dict)  # MultimodalLMConfig fields (connector, n_query, ...)
    epochs: int = Field(2, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = 1.0
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    max_items: int | None = Field(300, ge=1)  # training items (None: all that are not held out)
    heldout_frac: float = Field(0.1, gt=0, lt=1)
    max_heldout: int | None = Field(60, ge=2)
    missing_images: Literal["skip", "token"] = "skip"  # drop items without image, or give them the missing token
    prompt: str = f"{IMAGE_TOKEN} Describe this product."
    target_template: str = "{title}"  # str.format over the item's text fields (+ parsed title/categories/brand)
    strip_prefixes: list[str] = Field(default_factory=list)  # removed from the start of every text field value
    keyword_fields: list[str] = Field(default_factory=lambda: ["category"])
    max_keyword_df: float = Field(0.5, gt=0, le=1)
    max_answer_tokens: int = Field(32, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    n_examples: int = Field(8, ge=0)  # generations shown in the report
    seed: int = 0
    num_threads: int | None = None  # torch threads (None: leave as is)
    keep_checkpoints: int = Field(3, ge=1)
    out: str = "runs/align"

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if v.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"prompt must contain {IMAGE_TOKEN} exactly once")
        return v

    @field_validator("connector")
    @classmethod
    def _connector(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(set(v) & _RESERVED_CONNECTOR_KEYS)
        if bad:
            raise ValueError(f"connector: {bad} are set by the alignment run (image_feature, lm, dtype; no LoRA)")
        MultimodalLMConfig(**v, d_image=1, adapters=[])  # unknown keys / bad values fail here, with pydantic's message
        return v


def keyword_scores(generations: Sequence[str], keywords: Sequence[set[str]], *, n_perm: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Keyword recall of ``generations`` against their own ``keywords``, the chance level (scored against every other
    item's keywords) and a one-sided permutation p-value; items without keywords are left out."""
    idx = [i for i, k in enumerate(keywords) if k]
    gw = [words(generations[i]) for i in idx]
    kw = [keywords[i] for i in idx]
    n = len(idx)
    if n == 0:
        return {"n": 0, "recall": None, "chance": None, "p_value": None, "hits": []}
    hit = np.array([[bool(gw[i] & kw[j]) for j in range(n)] for i in range(n)], dtype=bool)
    recall = float(hit.diagonal().mean())
    if n > 1:
        off = hit.sum(1) - hit.diagonal()
        chance = float((off / (n - 1)).mean())
        rng = np.random.default_rng(seed)
        ge = 0
        for _ in range(n_perm):
            p = rng.permutation(n)
            sigma = np.empty(n, dtype=np.int64)
            sigma[p] = np.roll(p, -1)  # a random cyclic derangement
            if hit[np.arange(n), sigma].mean() >= recall - 1e-12:
                ge += 1
        p_value = (1 + ge) / (1 + n_perm)
    else:
        chance, p_value = None, None
    return {"n": n, "recall": recall, "chance": chance, "p_value": p_value,
            "hits": [int(h) for h in hit.diagonal()], "items_evaluated": idx}


# ------------------------------------------------------------------------------------------------------ utilities
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _config_key(cfg: AlignmentConfig) -> dict[str, Any]:
    """What must match for a resume (everything but the run length, progress-only and output settings)."""
    return cfg.model_dump(mode="json", exclude={"epochs", "num_threads", "keep_checkpoints", "out", "n_examples",
                                                "eval_batch_size", "device"})


def _lr_at(cfg: AlignmentConfig, step: int, total: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine" and total > 0:
        progress = min(1.0, step / max(1, total))
        return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * warm


def _checkpoints(ckdir: Path) -> list[tuple[int, Path]]:
    if not ckdir.is_dir():
        return []
    out = []
    for p in ckdir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / "state.json").is_file() and (p / "connector.safetensors").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


# ------------------------------------------------------------------------------------------------------- the data
class _AlignData:
    """Selected items, their image features, targets and category words."""

    def __init__(self, cfg: AlignmentConfig, ds: Dataset, tokenizer: Any | None = None):
        self.cfg = cfg
        n = ds.n_items
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xA11]))
        perm = rng.permutation(np.arange(1, n + 1))
        n_held = max(2, round(cfg.heldout_frac * n))
        if cfg.max_heldout is not None:
            n_held = min(n_held, cfg.max_heldout)
        if n_held >= n:
            raise ValueError(f"{n} items are too few to hold out {n_held}")
        held = perm[:n_held]
        rest = perm[n_held:]
        train = rest if cfg.max_items is None else rest[: cfg.max_items]
        self.notes: list[str] = []

        feats, missing = self._features(ds, np.concatenate([train, held]))
        feat_of = {int(i): k for k, i in enumerate(np.concatenate([train, held]))}
        if cfg.missing_images == "skip":
            keep_t = [i for i in train if not missing[feat_of[int(i)]]]
            keep_h = [i for i in held if not missing[feat_of[int(i)]]]
            dropped = len(train) + len(held) - len(keep_t) - len(keep_h)
            if dropped:
                self.notes.append(f"{dropped} selected items without image features skipped")
            train, held = np.asarray(keep_t, dtype=np.int64), np.asarray(keep_h, dtype=np.int64)
        self.train_items = [int(i) for i in train]
        self.heldout_items = [int(i) for i in held]
        self.features = {int(i): torch.from_numpy(np.ascontiguousarray(feats[feat_of[int(i)]])) for i in
                         self.train_items + self.heldout_items}
        self.missing = {int(i): bool(missing[feat_of[int(i)]]) for i in self.train_items + self.heldout_items}
        self.d_image = int(feats.shape[1])

        all_fields = [item_fields(ds, i, cfg.strip_prefixes) for i in range(1, n + 1)]
        for k in cfg.keyword_fields:
            if k not in all_fields[0]:
                raise ValueError(f"keyword field {k!r} is not an item text field; have {sorted(all_fields[0])}")
        try:
            self.targets_raw = {i: cfg.target_template.format(**all_fields[i - 1]).strip()
                                for i in self.train_items + self.heldout_items}
        except KeyError as e:
            raise ValueError(f"target_template names the unknown field {e}; have {sorted(all_fields[0])}") from None
        kw_all, self.common_words = keyword_sets(all_fields, cfg.keyword_fields, cfg.max_keyword_df)
        self.keywords = {i: kw_all[i - 1] for i in self.heldout_items}
        self.tokenizer = tokenizer
        self.targets: dict[int, str] = {}

    def set_tokenizer(self, tok: Any) -> None:
        """Cut the targets to ``max_answer_tokens`` tokens of this tokenizer."""
        m = self.cfg.max_answer_tokens
        for i, t in self.targets_raw.items():
            ids = tok(t, add_special_tokens=False)["input_ids"]
            self.targets[i] = t if len(ids) <= m else tok.decode(ids[:m], skip_special_tokens=True).strip()

    def _features(self, ds: Dataset, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        if cfg.image_feature == "effnet":
            if not ds.items.image_paths:
                raise ValueError(f"dataset {ds.name!r} has no image paths: image_feature 'effnet' needs images; "
                                 f"use one of its features {sorted(ds.items.features)}")
            from ..features import ImageEncoder, encode_images

            enc = ImageEncoder(cfg.image_encoder, top_k=0, batch_size=16)
            paths = [ds.items.image_paths[i - 1] for i in items]
            r = encode_images(enc, paths)
            self.notes.append(f"image features: {enc.feature_name} ({r.summary()})")
            return r.features.astype(np.float32), r.missing.astype(bool)
        if cfg.image_feature not in ds.items.features:
            raise ValueError(f"dataset {ds.name!r} has no feature {cfg.image_feature!r}; have "
                             f"{sorted(ds.items.features)} (or 'effnet' to encode its images)")
        m = ds.items.features[cfg.image_feature][items].astype(np.float32)
        return m, ~m.any(1)

    def batch(self, items: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self.features[i] for i in items]).to(device)
        mask = torch.tensor([not self.missing[i] for i in items])
        return x, mask


# ------------------------------------------------------------------------------------------------------- the model
def build_model(cfg: AlignmentConfig, d_image: int) -> MultimodalLM:
    """A MultimodalLM without LoRA on the frozen LM named by ``cfg.lm`` (``"tiny"``: a random 2-layer Llama)."""
    from ..llm.backbone import load_causal_lm, resolve_dtype, tiny_llama

    dev = _resolve_device(cfg.device)
    mcfg = MultimodalLMConfig(**{**cfg.connector, "d_image": d_image, "adapters": [], "base": cfg.lm,
                                 "dtype": cfg.dtype})
    if cfg.lm == "tiny":
        tok, lm = tiny_llama(seed=cfg.seed)
        lm.to(device=dev, dtype=resolve_dtype(cfg.dtype))
    else:
        tok, lm = load_causal_lm(cfg.lm, cfg.dtype, device=dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mm = MultimodalLM(tok, lm, mcfg)
    mm.lm.eval()
    mm.special_embed.requires_grad_(False)  # not part of the caption prompt
    return mm


def trainable_parameters(mm: MultimodalLM, with_missing: bool) -> list[torch.nn.Parameter]:
    params = list(mm.connector.parameters())
    if with_missing:
        params.append(mm.missing_image)
    else:
        mm.missing_image.requires_grad_(False)
    return params


@torch.no_grad()
def evaluate(mm: MultimodalLM, data: _AlignData, cfg: AlignmentConfig, *, generate: bool = True,
             progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Held-out caption loss (token mean) and, with ``generate``, keyword recall / chance / generations."""
    from tqdm.auto import tqdm

    was = mm.connector.training
    mm.connector.eval()
    items = data.heldout_items
    bs = cfg.eval_batch_size
    tot, ntok = 0.0, 0
    gens: list[str] = []
    chunks = [items[k:k + bs] for k in range(0, len(items), bs)]
    bar = tqdm(total=len(chunks) * (2 if generate else 1), desc=desc, disable=not progress, leave=False)
    eos = 1 if mm.tokenizer.eos_token_id is not None else 0
    for chunk in chunks:
        x, mask = data.batch(chunk, mm.device)
        answers = [data.targets[i] for i in chunk]
        loss = mm.lm_loss([cfg.prompt] * len(chunk), answers, image_features=x, image_mask=mask, reduction="sum")
        tot += float(loss)
        ntok += sum(len(mm.tokenizer(a, add_special_tokens=False)["input_ids"]) + eos for a in answers)
        bar.update()
        if generate:
            gens += mm.generate(x, cfg.prompt, max_new_tokens=cfg.max_new_tokens, image_mask=mask)
            bar.update()
    bar.close()
    if was:
        mm.connector.train()
    loss = tot / max(1, ntok)
    out: dict[str, Any] = {"caption_loss": loss, "caption_ppl": math.exp(min(loss, 50.0)), "answer_tokens": ntok}
    if generate:
        kw = [data.keywords[i] for i in items]
        sc = keyword_scores(gens, kw, seed=cfg.seed)
        out.update({"keyword_recall": sc["recall"], "chance": sc["chance"], "p_value": sc["p_value"],
                    "n_keyword_items": sc["n"], "generations": gens})
    return out


# ------------------------------------------------------------------------------------------------- checkpointing
def _save_checkpoint(mm: MultimodalLM, opt: torch.optim.Optimizer, ckdir: Path, epoch: int,
                     state: dict[str, Any], keep: int) -> Path:
    from safetensors.torch import save_file

    from .checkpoint import _flatten_optimizer

    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"epoch-{epoch:03d}"
    tmp = ckdir / f".epoch-{epoch:03d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    mm.save_trainable(tmp)
    tensors, meta = _flatten_optimizer(opt)
    tensors["torch_rng_state"] = torch.get_rng_state()
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()} or {"_": torch.zeros(1)},
              str(tmp / "optimizer.safetensors"), metadata={"optimizer": json.dumps(meta)})
    (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for e, p in _checkpoints(ckdir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _load_checkpoint(mm: MultimodalLM, opt: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    mm.load_trainable(path)
    tensors = load_file(str(path / "optimizer.safetensors"))
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["optimizer"])
    rng = tensors.pop("torch_rng_state", None)
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v.to(mm.device)
    for k, v in meta["scalars"].items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if rng is not None:
        torch.set_rng_state(rng)
    return json.loads((path / "state.json").read_text())


# ----------------------------------------------------------------------------------------------------------- run
def pretrain_connector(cfg: AlignmentConfig | dict, *, dataset: Dataset | None = None, resume: bool = True,
                       progress: bool = True) -> dict[str, Any]:
    """Run the alignment pretraining described in the module docstring; returns the report (also written to
    ``<out>/report.json`` and ``<out>/report.md``). ``dataset``: use this Dataset instead of loading
    ``cfg.dataset``. ``resume=False`` starts over (existing checkpoints in ``out`` are removed)."""
    from tqdm.auto import tqdm

    cfg = cfg if isinstance(cfg, AlignmentConfig) else AlignmentConfig(**cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckdir = out / "checkpoints"
    key = _config_key(cfg)
    cfg_path = out / "config.json"
    if not resume:
        shutil.rmtree(ckdir, ignore_errors=True)
        for name in ("before.json", "report.json", "report.md"):
            (out / name).unlink(missing_ok=True)
    elif cfg_path.is_file() and _checkpoints(ckdir):
        old = json.loads(cfg_path.read_text()).get("key")
        if old != key:
            diff = sorted(k for k in set(key) | set(old or {}) if (old or {}).get(k) != key.get(k))
            raise ValueError(f"{out} holds checkpoints of another alignment config (differs in {diff}); "
                             "use another 'out' or resume=False")
    _atomic_write_text(cfg_path, json.dumps({"config": cfg.model_dump(mode="json"), "key": key}, indent=1))

    ds = dataset if dataset is not None else load_dataset(cfg.dataset)
    t0 = time.perf_counter()
    data = _AlignData(cfg, ds)
    t_features = time.perf_counter() - t0
    if len(data.train_items) == 0 or len(data.heldout_items) < 2:
        raise ValueError(f"not enough items: {len(data.train_items)} train, {len(data.heldout_items)} held out")
    t0 = time.perf_counter()
    mm = build_model(cfg, data.d_image)
    t_load = time.perf_counter() - t0
    data.set_tokenizer(mm.tokenizer)
    lm_before = {k: v.detach().clone() for k, v in mm.lm.state_dict().items()} if cfg.lm == "tiny" else None
    with_missing = cfg.missing_images == "token" and any(data.missing[i] for i in data.train_items)
    params = trainable_parameters(mm, with_missing)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_trainable = sum(p.numel() for p in params)
    n_lm = sum(p.numel() for p in mm.lm.parameters())

    # BEFORE (computed once per run folder)
    before_path = out / "before.json"
    if resume and before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        with torch.random.fork_rng(devices=[]):
            before = evaluate(mm, data, cfg, progress=progress, desc="before")
        _atomic_write_text(before_path, json.dumps(before, indent=1))

    # resume
    start_epoch, step, history = 0, 0, []
    cks = _checkpoints(ckdir) if resume else []
    resumed_from = None
    if cks:
        e, p = cks[-1]
        st = _load_checkpoint(mm, opt, p)
        start_epoch, step, history = e, int(st["step"]), list(st.get("history", []))
        resumed_from = str(p)

    n_train = len(data.train_items)
    n_batches = math.ceil(n_train / cfg.batch_size)
    total_steps = n_batches * cfg.epochs
    mm.connector.train()
    bar = tqdm(total=total_steps, initial=min(step, total_steps), desc="align", unit="batch", disable=not progress,
               dynamic_ncols=True)
    t_train = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        t_ep = time.perf_counter()
        order = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xE0C, epoch])).permutation(n_train)
        losses = []
        for b in range(n_batches):
            chunk = [data.train_items[j] for j in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            x, mask = data.batch(chunk, mm.device)
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step, total_steps)
            loss = mm.lm_loss([cfg.prompt] * len(chunk), [data.targets[i] for i in chunk], image_features=x,
                              image_mask=mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.3f}")
        with torch.random.fork_rng(devices=[]):
            ev = evaluate(mm, data, cfg, generate=False)
        t_train += time.perf_counter() - t_ep
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "heldout_loss": ev["caption_loss"],
                        "seconds": round(time.perf_counter() - t_ep, 2)})
        bar.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {history[-1]['train_loss']:.4f}, "
                  f"held-out caption loss {ev['caption_loss']:.4f}")
        _save_checkpoint(mm, opt, ckdir, epoch + 1, {"step": step, "history": history}, cfg.keep_checkpoints)
    bar.close()

    # AFTER
    with torch.random.fork_rng(devices=[]):
        after = evaluate(mm, data, cfg, progress=progress, desc="after")
    write_folder_atomically(out / "connector", mm.save_trainable)

    lm_unchanged = None
    if lm_before is not None:
        lm_unchanged = all(torch.equal(v, mm.lm.state_dict()[k]) for k, v in lm_before.items())
    examples = []
    for k, i in enumerate(data.heldout_items[: cfg.n_examples]):
        examples.append({"item": ds.items.ids[i - 1], "target": data.targets[i],
                         "keywords": sorted(data.keywords[i]), "before": before["generations"][k],
                         "after": after["generations"][k]})
    strip = {"generations"}
    report = {
        "format": REPORT_FORMAT,
        "kind": "distillrec.connector_alignment",
        "dataset": ds.name,
        "config": cfg.model_dump(mode="json"),
        "lm": cfg.lm, "dtype": cfg.dtype, "lm_parameters": n_lm, "trainable_parameters": n_trainable,
        "connector": mm.config.connector, "d_image": data.d_image,
        "n_train": n_train, "n_heldout": len(data.heldout_items),
        "heldout_items": [ds.items.ids[i - 1] for i in data.heldout_items],
        "common_words_removed": data.common_words,
        "before": {k: v for k, v in before.items() if k not in strip},
        "after": {k: v for k, v in after.items() if k not in strip},
        "history": history,
        "examples": examples,
        "resumed_from": resumed_from,
        "lm_unchanged": lm_unchanged,
        "notes": data.notes,
        "chance_definition": "mean over held-out items i (with category words) of the fraction of other held-out "
                             "items j != i whose category words occur in i's generation",
        "seconds": {"features": round(t_features, 2), "load_lm": round(t_load, 2), "train": round(t_train, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
        "torch_threads": torch.get_num_threads(),
    }
    _atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    _atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _f(x: Any, nd: int = 4) -> str:
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def render_markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    b, a = r["before"], r["after"]
    lines = [
        f"# Connector alignment pretraining: {r['dataset']}",
        "",
        f"LM `{r['lm']}` ({r['dtype']}, {r['lm_parameters']:,} parameters, frozen, no LoRA); connector "
        f"`{r['connector']}` on `{c['image_feature']}` features (d={r['d_image']}), {r['trainable_parameters']:,} "
        f"trainable parameters. {r['n_train']} training items, {r['n_heldout']} held-out items, {c['epochs']} epochs, "
        f"lr {c['lr']}, batch {c['batch_size']}, seed {c['seed']}.",
        "",
        f"Prompt `{c['prompt']}`, answer `{c['target_template']}` (at most {c['max_answer_tokens']} tokens); "
        f"keyword fields {c['keyword_fields']}; greedy generation of {c['max_new_tokens']} tokens.",
        "",
        "| held-out | caption loss | perplexity | keyword recall | chance | p (permutation) | items scored |",
        "|---|---|---|---|---|---|---|",
        f"| before | {_f(b['caption_loss'])} | {_f(b['caption_ppl'], 2)} | {_f(b.get('keyword_recall'), 3)} | "
        f"{_f(b.get('chance'), 3)} | {_f(b.get('p_value'), 4)} | {b.get('n_keyword_items')} |",
        f"| after | {_f(a['caption_loss'])} | {_f(a['caption_ppl'], 2)} | {_f(a.get('keyword_recall'), 3)} | "
        f"{_f(a.get('chance'), 3)} | {_f(a.get('p_value'), 4)} | {a.get('n_keyword_items')} |",
        "",
        "Keyword recall: fraction of held-out items whose greedy generation from the image tokens alone contains at "
        "least one of the item's category words. Chance: " + r["chance_definition"] + ". p: one-sided permutation "
        "test over 1000 random n-cycles (no item scored against itself).",
    ]
    if r["common_words_removed"]:
        lines += ["", f"Words in more than {c['max_keyword_df']:.0%} of items, not counted as category words: "
                      + ", ".join(r["common_words_removed"][:30])]
    if r["history"]:
        lines += ["", "| epoch | train loss | held-out caption loss | seconds |", "|---|---|---|---|"]
        lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {h['heldout_loss']:.4f} | {h['seconds']} |"
                  for h in r["history"]]
    if r["examples"]:
        lines += ["", "| item | target | category words | before | after |", "|---|---|---|---|---|"]
        esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines += [f"| {e['item']} | {esc(e['target'])} | {esc(' '.join(e['keywords']))} | {esc(e['before'])} | "
                  f"{esc(e['after'])} |" for e in r["examples"]]
    if r["notes"]:
        lines += ["", "Notes: " + "; ".join(r["notes"])]
    s = r["seconds"]
    lines += ["", f"Time: features {s['features']} s, LM load {s['load_lm']} s, training {s['train']} s, total "
                  f"{s['total']} s ({r['torch_threads']} torch threads)."
              + (f" Resumed from `{r['resumed_from']}`." if r["resumed_from"] else ""), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- CLI
def load_alignment_config(path: str | Path, overrides: Sequence[str] = ()) -> AlignmentConfig:
    """Read a YAML recipe and apply ``key.sub=value`` overrides; errors name the key (ConfigError)."""
    from .config import read_config

    return read_config(path, list(overrides), AlignmentConfig, "dataset, lm, connector, epochs, ...")[0]


def main(config_path: str | Path, overrides: Sequence[str] = (), *, out: str | Path | None = None,
         restart: bool = False, progress: bool = True) -> dict[str, Any]:
    """Entry point for ``distillrec align CONFIG [--set k=v ...] [--out DIR] [--restart]``: run, print the summary
    table, return the report. Resumes from the run folder's checkpoints unless ``restart``."""
    cfg = load_alignment_config(config_path, overrides)
    if out is not None:
        cfg = cfg.model_copy(update={"out": str(out)})
    report = pretrain_connector(cfg, resume=not restart, progress=progress)
    b, a = report["before"], report["after"]
    print(f"held-out ({report['n_heldout']} items, {a.get('n_keyword_items')} with category words):")
    print(f"  before: caption loss {b['caption_loss']:.4f}, keyword recall {_f(b.get('keyword_recall'), 3)} "
          f"(chance {_f(b.get('chance'), 3)})")
    print(f"  after:  caption loss {a['caption_loss']:.4f}, keyword recall {_f(a.get('keyword_recall'), 3)} "
          f"(chance {_f(a.get('chance'), 3)}, p={_f(a.get('p_value'), 4)})")
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return report


if __name__ == "__main__":  # python -m distillrec.training.align CONFIG [k=v ...]
    import sys

    main(sys.argv[1], sys.argv[2:])
