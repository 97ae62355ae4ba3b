"""TPAD end to end (``distillrec tpad CONFIG``): Knowledge-MLLM, Transfer-MLLM, transitional pattern alignment, and
the one-time item embedding that downstream recommenders (DIMO, fused SASRec/GRU4Rec) consume.

Stages (DESIGN.md, "TPAD as this project defines it"; losses in :mod:`distillrec.methods.tpad.model`):

1. ``knowledge`` -- the ``knowledge`` LoRA tower, the visual connector, the missing-image token and the summary-token
   embeddings learn L_gen (answer-only LM loss on ``"Keywords: ... Category: ..."``, see
   :mod:`~distillrec.methods.tpad.keywords`) + ``contrast_weight`` * (L^v + L^t). Each item of a batch loses its
   image or its text with probability ``modality_dropout / 2`` each, so single-modality prompts are trained and the
   keyword generation rate (GR) per modality is meaningful. GR is measured on ``gr_items`` held-out items before
   training and after every epoch.
2. ``transfer`` (2a) -- the ``transfer`` LoRA tower alone (connector and summary tokens frozen) learns InfoNCE between
   the two items of multi-order meta pairs (t, t + k), k = 1..``max_order``, from the training sequences only.
3. ``align`` (2b) -- the Transfer tower is frozen (its states are computed once, without gradients); the Knowledge
   tower continues from stage 1 with L = L_gen + contrast_weight (L^v + L^t) + gamma1 CLUB(D_H(h); D_T(t))
   - gamma2 MINE(D_L(h); D_T(t)). Before every encoder step the estimators (CLUB's q, MINE's T) take ``q_steps``
   steps on the detached projector outputs: with one step per encoder step the encoder outruns q and the CLUB
   estimate stops bounding anything (measured in issue 4, part 1).
4. ``embed`` -- only the final Knowledge tower runs, once per item, through ``distillrec embed``
   (``<out>/embeddings``: ``item_embeddings.safetensors`` + ``item_ids.json``). Attach them to a run config with
   ``dataset.embeddings: {tpad: <out>/embeddings}`` -> features ``tpad_image``, ``tpad_text``.

Ablations are config switches: ``alignment.gamma1/gamma2 = 0`` (both 0 = TPAD-NA: stage 2b still runs, as the same
number of steps without alignment), ``use_image: false``, ``use_text: false``, ``towers: single`` (one LoRA tower
learns the transition task after the knowledge task; no alignment stage).

Every stage checkpoints atomically every ``save_every`` steps and at the end of each epoch (trainable LM parts, heads,
optimizers, torch RNG); rerunning the same command resumes from the newest checkpoint and, seeded, ends where an
uninterrupted run ends (batch order and modality dropout depend only on (seed, stage, epoch)). A finished stage is
skipped; a stage's config is part of its key, so a changed config with the same ``out`` is an error, not a silent mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data.dataset import Dataset
from ..data.loaders import DatasetConfig, load_dataset
from ..llm.multimodal import MultimodalLM, MultimodalLMConfig
from ..methods.tpad.keywords import KeywordConfig, KeywordTargets, generation_rate, keyword_targets
from ..methods.tpad.model import TransitionalPatternAlignment, TransitionContrast, ViewContrast, meta_pairs
from .checkpoint import load_checkpoint, save_checkpoint, write_folder_atomically
from .config import ConfigError, read_config
from .embed import LMSpec, item_image_matrix, item_texts

STAGES = ("knowledge", "transfer", "align", "embed")
KNOWLEDGE, TRANSFER = "knowledge", "transfer"
CURVE_EVERY = 10  # steps per point of the training curves in the report


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = 1.0
    max_items: int | None = Field(None, ge=2)  # training items (knowledge, align) or meta pairs (transfer) per epoch


class KnowledgeConfig(StageConfig):
    modality_dropout: float = Field(0.3, ge=0, lt=1)
    gr_items: int = Field(48, ge=0)  # held-out items for the keyword generation rate
    gr_max_new_tokens: int = Field(20, ge=1)


class TransferConfig(StageConfig):
    max_order: int = Field(3, ge=1)  # K: pairs (t, t + k), k = 1..K
    max_len: int = Field(50, ge=2)  # the last items of each training sequence that pairs are drawn from
    context_items: int = Field(0, ge=0)  # earlier items of the session named in the anchor's prompt
    instruction: str = "Read the item below; the user will look at a related item next."


class AlignConfig(StageConfig):
    gamma1: float = Field(0.1, ge=0)  # CLUB (minimised)
    gamma2: float = Field(0.1, ge=0)  # MINE (maximised)
    d_proj: int = Field(64, ge=2)
    estimator_hidden: int = Field(64, ge=2)
    estimator_lr: float = Field(1e-3, gt=0)
    q_steps: int = Field(3, ge=1)
    club: Literal["full", "sampled"] = "sampled"
    mine_ma_rate: float | None = 0.01
    modality_dropout: float = Field(0.3, ge=0, lt=1)


class TPADConfig(BaseModel):
    """``distillrec tpad`` recipe (YAML: ``configs/tpad/*.yaml``); unknown keys are errors that name them."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetConfig
    lm: LMSpec = Field(default_factory=LMSpec)
    multimodal: dict[str, Any] = Field(default_factory=dict)  # MultimodalLMConfig fields (connector, num_layers...)
    image_features: str | None = "image_effnet_lite0"  # an item feature (image_clip) or the bundled encoder's
    text_fields: list[str] | None = None  # None: every text field
    text_view: str | None = "text_minilm"  # frozen text feature for L^t (text_minilm is computed); None: no L^t
    use_image: bool = True
    use_text: bool = True
    towers: Literal["two", "single"] = "two"
    contrast_weight: float = Field(0.1, ge=0)
    temperature: float = Field(0.1, gt=0)
    d_contrast: int = Field(128, ge=2)
    keywords: KeywordConfig = Field(default_factory=KeywordConfig)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    embed_batch_size: int = Field(32, ge=1)
    seed: int = 0
    save_every: int = Field(50, ge=1)  # steps between checkpoints (and at every epoch end)
    num_threads: int | None = Field(None, ge=1)
    progress: bool = True
    out: str = "runs/tpad"


def load_tpad_config(path: str | Path, overrides: Sequence[str] = ()) -> TPADConfig:
    return read_config(path, list(overrides), TPADConfig, "dataset, lm, multimodal, knowledge, transfer, align")[0]


# ---------------------------------------------------------------------------------------------------------- helpers
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TPADData:
    """What every stage reads: item texts, image and text-view features, keyword answers, the held-out GR items and
    the training sequences. Item ``i`` (1..n) everywhere; row 0 of the matrices is padding."""

    def __init__(self, cfg: TPADConfig, ds: Dataset):
        self.ds = ds
        items = ds.items
        n = items.n_items
        self.texts = [""] + item_texts(items, cfg.text_fields if cfg.use_text else [])
        image = item_image_matrix(cfg.image_features, items, cfg.progress) if cfg.use_image else None
        self.image = None if image is None else torch.from_numpy(image)
        self.has_image = np.zeros(n + 1, bool) if image is None else image.any(1)
        self.d_image = 1 if image is None else int(image.shape[1])
        self.text_view = None
        if cfg.text_view is not None and cfg.use_text:
            if cfg.text_view not in items.features:
                from ..features.cache import encode_missing_features

                if not encode_missing_features(items, [cfg.text_view], cfg.text_fields, cfg.progress):
                    raise ConfigError(f"text_view: the dataset has no feature '{cfg.text_view}' (it has "
                                      f"{sorted(items.features)}); use 'text_minilm' (computed) or null")
            self.text_view = torch.from_numpy(np.asarray(items.features[cfg.text_view], np.float32))
        self.has_text = np.array([bool(t.strip()) for t in self.texts])
        self.targets: KeywordTargets = keyword_targets(ds, cfg.keywords, items.image_paths)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x6E]))
        perm = rng.permutation(np.arange(1, n + 1))
        n_gr = min(cfg.knowledge.gr_items, max(0, n - 2))
        self.gr_items = sorted(int(i) for i in perm[:n_gr])
        self.train_items = np.array(sorted(int(i) for i in perm[n_gr:]), dtype=np.int64)
        self.sequences = ds.train

    def images(self, items: np.ndarray, drop: np.ndarray | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        mask = torch.from_numpy(self.has_image[items].copy())
        if drop is not None:
            mask &= ~torch.from_numpy(drop)
        if self.image is None:
            return None, mask
        return self.image[torch.from_numpy(items)], mask


def build_multimodal(cfg: TPADConfig, d_image: int) -> MultimodalLM:
    """The LM named by ``cfg.lm`` with a connector and two LoRA towers, seeded by ``cfg.lm.seed``."""
    from ..llm.backbone import load_causal_lm, resolve_dtype, tiny_llama

    reserved = sorted(set(cfg.multimodal) & {"base", "dtype", "d_image", "adapters"})
    if reserved:
        raise ConfigError(f"multimodal: {reserved} are set by the TPAD run (lm, image_features, towers)")
    mcfg = MultimodalLMConfig(**{**cfg.multimodal, "base": cfg.lm.name, "dtype": cfg.lm.dtype,
                                 "d_image": d_image, "adapters": [KNOWLEDGE, TRANSFER]})
    dev = torch.device(cfg.lm.device) if cfg.lm.device else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    if cfg.lm.name == "tiny":
        tok, lm = tiny_llama(seed=cfg.lm.seed)
        lm.to(device=dev, dtype=resolve_dtype(cfg.lm.dtype))
    else:
        try:
            tok, lm = load_causal_lm(cfg.lm.name, cfg.lm.dtype, cfg.lm.cache_dir, device=dev,
                                     attn_implementation=cfg.lm.attn_implementation)
        except (OSError, ValueError, ModuleNotFoundError) as e:
            raise ConfigError(f"lm.name '{cfg.lm.name}': could not load the language model: {e}") from None
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.manual_seed(cfg.lm.seed)
        mm = MultimodalLM(tok, lm, mcfg)
    return mm


def _set_trainable(mm: MultimodalLM, tower: str, shared: bool) -> None:
    """Make ``tower`` the active (trainable) LoRA tower; ``shared``: the connector, missing-image token and summary
    token embeddings train too (stages 1 and 2b), else they are frozen (stage 2a)."""
    mm.use_adapter(tower)
    for p in [*mm.connector.parameters(), mm.missing_image, mm.special_embed.weight]:
        p.requires_grad_(shared)


def _trainable(mm: MultimodalLM, heads: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in mm.trainable_named_parameters()] + [p for p in heads.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------- the stage loop
class Stage:
    """One resumable training stage: ``step(units, epoch, step) -> dict of float losses`` over shuffled units."""

    def __init__(self, name: str, cfg: TPADConfig, scfg: StageConfig, out: Path, key: dict[str, Any]):
        self.name, self.cfg, self.scfg = name, cfg, scfg
        self.dir = out / name
        self.key = _key(key)

    @property
    def done_dir(self) -> Path:
        return self.dir / "final"

    def finished(self) -> bool:
        st = self.dir / "final" / "stage.json"
        return st.is_file() and json.loads(st.read_text()).get("key") == self.key

    def load_finished(self, mm: MultimodalLM) -> dict[str, Any] | None:
        """A finished stage of this config: load its result into ``mm`` and return its state. Otherwise None (and an
        error when the folder holds an unfinished checkpoint of another config)."""
        if self.finished():
            mm.load_trainable(self.done_dir)
            return json.loads((self.done_dir / "stage.json").read_text())
        ck = self.dir / "checkpoint" / "stage.json"
        if ck.is_file() and json.loads(ck.read_text()).get("key") != self.key:
            raise ConfigError(f"{self.dir} holds a checkpoint of another {self.name} config; use another 'out', "
                              "or --restart")
        return None

    def save(self, folder: Path, mm: MultimodalLM, heads: nn.Module, opts: list[torch.optim.Optimizer],
             state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            mm.save_trainable(tmp)
            save_checkpoint(tmp / "heads.safetensors", heads, state, opts[0] if opts else None)
            for k, o in enumerate(opts[1:], 1):
                save_checkpoint(tmp / f"optimizer{k}.safetensors", nn.Module(), {}, o)
            save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            (tmp / "stage.json").write_text(json.dumps({**state, "key": self.key}, indent=1))

        write_folder_atomically(folder, write)

    def load(self, folder: Path, mm: MultimodalLM, heads: nn.Module, opts: list[torch.optim.Optimizer]
             ) -> dict[str, Any]:
        from safetensors.torch import load_file

        mm.load_trainable(folder)
        state = load_checkpoint(folder / "heads.safetensors", heads, opts[0] if opts else None)
        for k, o in enumerate(opts[1:], 1):
            load_checkpoint(folder / f"optimizer{k}.safetensors", nn.Module(), o)
        torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
        return state

    def run(self, mm: MultimodalLM, heads: nn.Module, opts: list[torch.optim.Optimizer], n_units: int,
            step_fn: Callable[[np.ndarray, np.random.Generator], dict[str, float]],
            evaluate: Callable[[], dict[str, Any]] | None = None, log: Callable[[str], None] = print,
            stage_id: int = 0, evaluate_before: bool = True) -> dict[str, Any]:
        """``evaluate`` runs after every epoch and, with ``evaluate_before``, once before training (epoch 0)."""
        from tqdm.auto import tqdm

        s = self.scfg
        bs = s.batch_size
        n_batches = n_units // bs  # full batches only: InfoNCE needs negatives
        if n_batches == 0:
            raise ConfigError(f"{self.name}: {n_units} training units are fewer than batch_size {bs}")
        total = n_batches * s.epochs
        ck = self.dir / "checkpoint"
        state: dict[str, Any] = {"step": 0, "history": [], "running": {}, "curve": []}
        if (ck / "stage.json").is_file():
            state = self.load(ck, mm, heads, opts)
            log(f"{self.name}: resumed at step {state['step']}/{total}")
        else:  # LoRA dropout and the estimators' permutations draw from torch's RNG: seed it per stage
            torch.manual_seed(self.cfg.seed * 1000 + stage_id)
        if state["step"] == 0 and evaluate is not None and evaluate_before:
            mm.eval()
            with torch.random.fork_rng(devices=[]):
                state["history"].append({"epoch": 0, **evaluate()})
            mm.train()
        params = [p for o in opts[:1] for g in o.param_groups for p in g["params"]]
        bar = tqdm(total=total, initial=state["step"], desc=self.name, unit="step", disable=not self.cfg.progress,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        while state["step"] < total:
            epoch, b = divmod(state["step"], n_batches)
            order = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, stage_id, epoch])).permutation(
                n_units)
            rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, stage_id, epoch, b]))
            losses = step_fn(order[b * bs:(b + 1) * bs], rng)
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opts[0].step()
            opts[0].zero_grad(set_to_none=True)
            state["step"] += 1
            run = state["running"]
            for k, v in losses.items():
                run.setdefault(k, []).append(v)
            end_of_epoch = state["step"] % n_batches == 0
            if state["step"] % CURVE_EVERY == 0 or end_of_epoch:  # training curve: means of the last steps
                state["curve"].append({"step": state["step"],
                                       **{k: float(np.mean(v[-CURVE_EVERY:])) for k, v in run.items()}})
            bar.update()
            bar.set_postfix({k: f"{np.mean(v[-20:]):.3f}" for k, v in list(run.items())[:3]})
            if end_of_epoch:
                row: dict[str, Any] = {"epoch": epoch + 1, **{k: float(np.mean(v)) for k, v in run.items()}}
                if evaluate is not None:
                    mm.eval()
                    with torch.random.fork_rng(devices=[]):
                        row.update(evaluate())
                    mm.train()
                state["history"].append(row)
                state["running"] = {}
                log(f"{self.name} epoch {epoch + 1}/{s.epochs}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
            if end_of_epoch or state["step"] % self.cfg.save_every == 0:
                self.save(ck, mm, heads, opts, state)
        bar.close()
        state["seconds"] = round(time.perf_counter() - t0, 2)
        self.save(self.done_dir, mm, heads, opts, {**state, "finished": True})
        shutil.rmtree(ck, ignore_errors=True)
        return state


# ----------------------------------------------------------------------------------------------------- the stages
def _drop_modalities(rng: np.random.Generator, n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Per item: drop the image with probability p/2, else drop the text with probability p/2 (never both)."""
    r = rng.random(n)
    return r < p / 2, (r >= p / 2) & (r < p)


class _KnowledgeHeads(nn.Module):
    """The L^v / L^t heads (each None when its modality or view is absent, or when ``views`` is False)."""

    def __init__(self, cfg: TPADConfig, data: TPADData, d: int, views: bool = True):
        super().__init__()
        self.view_v = ViewContrast(d, data.d_image, cfg.d_contrast, cfg.temperature) \
            if views and data.image is not None else None
        self.view_t = ViewContrast(d, data.text_view.shape[1], cfg.d_contrast, cfg.temperature) \
            if views and data.text_view is not None else None


def _knowledge_losses(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, heads: _KnowledgeHeads, items: np.ndarray,
                      rng: np.random.Generator, p_drop: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Knowledge-tower pass: L_gen + contrast_weight (L^v + L^t), and h = [h_img; h_txt]."""
    drop_img, drop_txt = _drop_modalities(rng, len(items), p_drop)
    img, mask = data.images(items, drop_img)
    texts = ["" if d else data.texts[i] for i, d in zip(items, drop_txt)]
    o = mm.embed(texts, img, adapter=KNOWLEDGE, image_mask=mask, answers=[data.targets.answers[i] for i in items])
    t_items = torch.from_numpy(items)
    parts = {"gen": o["lm_loss"]}
    if heads.view_v is not None:
        parts["l_v"] = heads.view_v(o["image"], img.to(o["image"].device), mask.to(o["image"].device), t_items)
    if heads.view_t is not None:
        valid = torch.from_numpy(~drop_txt & data.has_text[items])
        parts["l_t"] = heads.view_t(o["text"], data.text_view[t_items].to(o["text"].device), valid, t_items)
    loss = parts["gen"] + cfg.contrast_weight * sum((v for k, v in parts.items() if k != "gen"),
                                                     start=torch.zeros(()))
    return loss, {"h": torch.cat([o["image"], o["text"]], -1), **parts}


@torch.no_grad()
def generation_rates(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, items: Sequence[int]) -> dict[str, Any]:
    """GR per modality on ``items``: greedy answers from image-only, text-only and full prompts."""
    if not items:
        return {}
    targets = [data.targets.target_words(i) for i in items]
    out: dict[str, Any] = {}
    arr = np.asarray(items, dtype=np.int64)
    modes = {"both": (True, True)}
    if data.image is not None and data.has_image[arr].any():
        modes["image"] = (True, False)
    if data.has_text[arr].any():
        modes["text"] = (False, True)
    bs = cfg.embed_batch_size
    for name, (use_img, use_txt) in modes.items():
        gens: list[str] = []
        for s in range(0, len(arr), bs):
            chunk = arr[s:s + bs]
            img, mask = data.images(chunk, None if use_img else np.ones(len(chunk), bool))
            prompts = [mm.item_prompt(data.texts[i] if use_txt else "") for i in chunk]
            gens += mm.generate(img, prompts, max_new_tokens=cfg.knowledge.gr_max_new_tokens, adapter=KNOWLEDGE,
                                image_mask=mask)
        out[f"gr_{name}"] = generation_rate(gens, targets)
        if name == "both":
            out["example"] = {"item": data.ds.items.ids[arr[0] - 1], "target": data.targets.answers[arr[0]],
                              "generated": gens[0]}
    return out


def stage_knowledge(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, out: Path, log: Callable) -> dict[str, Any]:
    k = cfg.knowledge
    stage = Stage("knowledge", cfg, k, out, _stage_key(cfg, "knowledge"))
    if (done := stage.load_finished(mm)) is not None:
        return done
    _set_trainable(mm, KNOWLEDGE, shared=True)
    heads = _seeded(cfg, 1, lambda: _KnowledgeHeads(cfg, data, mm.hidden_size))
    opt = torch.optim.AdamW(_trainable(mm, heads), lr=k.lr, weight_decay=k.weight_decay)
    items = data.train_items if k.max_items is None else data.train_items[: k.max_items]
    mm.train()

    def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        loss, parts = _knowledge_losses(cfg, data, mm, heads, items[idx], rng, k.modality_dropout)
        loss.backward()
        return {"loss": float(loss.detach()), **{n: float(v.detach()) for n, v in parts.items() if n != "h"}}

    return stage.run(mm, heads, [opt], len(items), step, lambda: generation_rates(cfg, data, mm, data.gr_items),
                     log, stage_id=1)


def _pair_texts(data: TPADData, pairs: np.ndarray, contexts: list[list[int]] | None) -> list[str]:
    if not contexts:
        return [data.texts[a] for a in pairs[:, 0]]
    titles = data.ds.items.text.get("title")
    name = (lambda i: titles[i - 1]) if titles else (lambda i: data.texts[i][:60])
    return [(f"Session so far: {'; '.join(name(c) for c in ctx)}. Now: " if ctx else "") + data.texts[a]
            for a, ctx in zip(pairs[:, 0], contexts)]


def stage_transfer(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, out: Path, log: Callable) -> dict[str, Any]:
    """Stage 2a; with ``towers: single`` the knowledge tower itself learns the transition task (plus L_gen)."""
    t = cfg.transfer
    stage = Stage("transfer", cfg, t, out, _stage_key(cfg, "transfer"))
    if (done := stage.load_finished(mm)) is not None:
        return done
    single = cfg.towers == "single"
    tower = KNOWLEDGE if single else TRANSFER
    _set_trainable(mm, tower, shared=single)
    d2 = 2 * mm.hidden_size
    heads = _seeded(cfg, 2, lambda: nn.ModuleDict({"transition": TransitionContrast(d2, cfg.d_contrast,
                                                                                     cfg.temperature)}))
    pairs, contexts = meta_pairs(data.sequences, t.max_order, max_len=t.max_len, context_items=t.context_items)
    if len(pairs) < t.batch_size:
        raise ConfigError(f"transfer: only {len(pairs)} meta pairs in the training sequences (< batch_size "
                          f"{t.batch_size}); lower transfer.batch_size")
    if t.max_items is not None and len(pairs) > t.max_items:
        keep = np.sort(np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x2A])).choice(
            len(pairs), t.max_items, replace=False))
        pairs = pairs[keep]
        contexts = [contexts[i] for i in keep] if contexts else None
    opt = torch.optim.AdamW(_trainable(mm, heads), lr=t.lr, weight_decay=t.weight_decay)
    no_views = _KnowledgeHeads(cfg, data, mm.hidden_size, views=False)
    mm.train()

    def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        p = pairs[idx]
        both = np.concatenate([p[:, 0], p[:, 1]])
        img, mask = data.images(both)
        texts = _pair_texts(data, p, [contexts[i] for i in idx] if contexts else None) + \
            [data.texts[i] for i in p[:, 1]]
        o = mm.embed(texts, img, adapter=tower, image_mask=mask, instruction=t.instruction)
        h = torch.cat([o["image"], o["text"]], -1)
        n = len(p)
        loss = heads["transition"](h[:n], h[n:], torch.from_numpy(p[:, 1]))
        parts = {"transition": float(loss.detach())}
        anchors = p[~np.isin(p[:, 0], data.gr_items), 0]  # GR's held-out items are never trained on
        if single and len(anchors):  # the one tower keeps its knowledge task
            kl, kparts = _knowledge_losses(cfg, data, mm, no_views, anchors, rng, 0.0)
            loss = loss + kl
            parts["gen"] = float(kparts["gen"].detach())
        loss.backward()
        return parts

    return stage.run(mm, heads, [opt], len(pairs), step, None, log, stage_id=2)


@torch.no_grad()
def transfer_states(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, items: np.ndarray) -> torch.Tensor:
    """The frozen Transfer tower's ``[t_img; t_txt]`` of ``items`` (computed once, in eval mode)."""
    from tqdm.auto import tqdm

    mm.eval()
    rows = []
    for s in tqdm(range(0, len(items), cfg.embed_batch_size), desc="transfer states", disable=not cfg.progress,
                  leave=False):
        chunk = items[s:s + cfg.embed_batch_size]
        img, mask = data.images(chunk)
        o = mm.embed([data.texts[i] for i in chunk], img, adapter=TRANSFER, image_mask=mask,
                     instruction=cfg.transfer.instruction)
        rows.append(torch.cat([o["image"], o["text"]], -1).cpu())
    mm.train()
    return torch.cat(rows)


def stage_align(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, out: Path, log: Callable) -> dict[str, Any]:
    a = cfg.align
    stage = Stage("align", cfg, a, out, _stage_key(cfg, "align"))
    if (done := stage.load_finished(mm)) is not None:
        return done
    items = data.train_items if a.max_items is None else data.train_items[: a.max_items]
    cache = out / "align" / "transfer_states.safetensors"
    if cache.is_file():
        from safetensors.torch import load_file

        t_states = load_file(str(cache))["states"]
    else:
        t_states = transfer_states(cfg, data, mm, items)
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        save_file({"states": t_states.contiguous()}, str(tmp))
        os.replace(tmp, cache)
    _set_trainable(mm, KNOWLEDGE, shared=True)
    d = mm.hidden_size

    heads = _seeded(cfg, 3, lambda: nn.ModuleDict({
        "views": _KnowledgeHeads(cfg, data, d),
        "tpa": TransitionalPatternAlignment(2 * d, 2 * d, a.d_proj, a.estimator_hidden, a.club, a.mine_ma_rate)}))
    # the stage-1 contrastive heads continue from stage 1
    k_heads = out / "knowledge" / "final" / "heads.safetensors"
    if k_heads.is_file():
        from safetensors.torch import load_file

        sd = {k.removeprefix("model."): v for k, v in load_file(str(k_heads)).items() if k.startswith("model.")}
        heads["views"].load_state_dict(sd)
    tpa: TransitionalPatternAlignment = heads["tpa"]
    view_heads: _KnowledgeHeads = heads["views"]
    est_params = tpa.estimator_parameters()
    est_ids = {id(p) for p in est_params}
    main_params = [p for p in _trainable(mm, heads) if id(p) not in est_ids]
    opt = torch.optim.AdamW(main_params, lr=a.lr, weight_decay=a.weight_decay)
    est_opt = torch.optim.Adam(est_params, lr=a.estimator_lr)
    mm.train()

    def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        b = items[idx]
        loss, parts = _knowledge_losses(cfg, data, mm, view_heads, b, rng, a.modality_dropout)
        t = t_states[torch.from_numpy(idx)].to(parts["h"].device)
        hh, hl, tt = tpa.project(parts["h"], t)
        for _ in range(a.q_steps):  # estimators first, on detached features
            est_opt.zero_grad(set_to_none=True)
            tpa.estimator_loss(hh, hl, tt).backward()
            est_opt.step()
        mi = tpa(hh, hl, tt)
        total = loss + a.gamma1 * mi["club"] - a.gamma2 * mi["mine"]
        total.backward()
        est_opt.zero_grad(set_to_none=True)  # the encoder step must not leak into the estimators
        return {"loss": float(total.detach()), **{n: float(v.detach()) for n, v in parts.items() if n != "h"},
                "club": float(mi["club"].detach()), "mine": float(mi["mine"].detach())}

    # no epoch-0 evaluation: it would repeat stage 1's last one
    return stage.run(mm, heads, [opt, est_opt], len(items), step,
                     lambda: generation_rates(cfg, data, mm, data.gr_items), log, stage_id=3, evaluate_before=False)


def _seeded(cfg: TPADConfig, k: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + k)
        return make()


def _stage_key(cfg: TPADConfig, stage: str) -> dict[str, Any]:
    """What a stage's result depends on: the shared settings, its own block and every earlier stage's."""
    shared = cfg.model_dump(mode="json", include={"dataset", "lm", "multimodal", "image_features", "text_fields",
                                                  "text_view", "use_image", "use_text", "towers", "contrast_weight",
                                                  "temperature", "d_contrast", "keywords", "seed"})
    shared["lm"].pop("device", None)
    if stage == "knowledge":  # stage 1 is the same for one or two towers: ablations can start from its result
        shared.pop("towers")
    order = ["knowledge", "transfer", "align"]
    for s in order[: order.index(stage) + 1]:
        shared[s] = getattr(cfg, s).model_dump(mode="json")
    return shared


# -------------------------------------------------------------------------------------------------------- the run
def run_tpad(cfg: TPADConfig, stages: Sequence[str] = STAGES, *, restart: bool = False,
             dataset: Dataset | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the named stages (in order; earlier finished stages are loaded, missing ones run first) and write
    ``<out>/report.json`` + ``report.md``. Returns the report."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out)
    if restart:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=1))
    t_start = time.perf_counter()
    last = max(STAGES.index(s) for s in stages)
    need = [s for s in STAGES[: last + 1] if s != "embed" and not (cfg.towers == "single" and s == "align")]
    report: dict[str, Any] = {"kind": "distillrec.tpad", "config": cfg.model_dump(mode="json"), "stages": {},
                              "seconds": {}}
    if need:
        ds = dataset if dataset is not None else load_dataset(cfg.dataset)
        t0 = time.perf_counter()
        data = TPADData(cfg, ds)
        report["seconds"]["features"] = round(time.perf_counter() - t0, 2)
        report["notes"] = data.targets.notes
        t0 = time.perf_counter()
        mm = build_multimodal(cfg, data.d_image)
        report["seconds"]["load_lm"] = round(time.perf_counter() - t0, 2)
        report["trainable_lm_parameters"] = {
            "connector": sum(p.numel() for p in mm.connector.parameters()),
            "lora_per_tower": sum(p.numel() for n, p in mm.named_parameters() if f"lora_A.{KNOWLEDGE}" in n
                                  or f"lora_B.{KNOWLEDGE}" in n)}
        runners = {"knowledge": stage_knowledge, "transfer": stage_transfer, "align": stage_align}
        for s in need:
            t0 = time.perf_counter()
            report["stages"][s] = _summary(runners[s](cfg, data, mm, out, log))
            report["seconds"][s] = round(time.perf_counter() - t0, 2)
        write_folder_atomically(out / "model", mm.save_trainable)
    if "embed" in stages:
        t0 = time.perf_counter()
        report["embeddings"] = embed_with_knowledge_tower(cfg, out)
        report["seconds"]["embed"] = round(time.perf_counter() - t0, 2)
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    _atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    _atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    return {"steps": state.get("step"), "history": state.get("history", []), "curve": state.get("curve", []),
            "seconds": state.get("seconds")}


def embed_with_knowledge_tower(cfg: TPADConfig, out: Path) -> dict[str, Any]:
    """``distillrec embed`` with the final Knowledge tower (``<out>/model``) -> ``<out>/embeddings``."""
    from .embed import EmbedConfig, embed_items

    model = out / "model"
    if not (model / "config.json").is_file():
        raise ConfigError(f"{model} not found: run the training stages first (distillrec tpad CONFIG)")
    ecfg = EmbedConfig(dataset=cfg.dataset, lm=cfg.lm, pretrained=str(model), adapter=KNOWLEDGE,
                       image_features=cfg.image_features if cfg.use_image else None,
                       text_fields=cfg.text_fields if cfg.use_text else [], batch_size=cfg.embed_batch_size,
                       shard_size=512, num_threads=cfg.num_threads, progress=cfg.progress)
    _atomic_write_text(out / "embed_config.json", json.dumps(ecfg.model_dump(mode="json"), indent=1))
    return embed_items(ecfg, out / "embeddings")


def _f(x: Any, nd: int = 3) -> str:
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def render_markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"# TPAD run: {c['dataset']['name']}", "",
             f"LM `{c['lm']['name']}` ({c['multimodal'].get('num_layers') or 'all'} layers), image features "
             f"`{c['image_features'] if c['use_image'] else None}`, text {'on' if c['use_text'] else 'off'}, "
             f"towers {c['towers']}, gamma1 {c['align']['gamma1']}, gamma2 {c['align']['gamma2']}, seed {c['seed']}.",
             ""]
    st = r.get("stages", {})
    if "knowledge" in st:
        lines += ["## Stage 1: Knowledge-MLLM", "",
                  "| epoch | loss | L_gen | L^v | L^t | GR both | GR image | GR text |", "|---|---|---|---|---|---|---|---|"]
        for h in st["knowledge"]["history"]:
            lines.append(f"| {h['epoch']} | {_f(h.get('loss'))} | {_f(h.get('gen'))} | {_f(h.get('l_v'))} | "
                         f"{_f(h.get('l_t'))} | {_f(h.get('gr_both'))} | {_f(h.get('gr_image'))} | "
                         f"{_f(h.get('gr_text'))} |")
        lines += ["", "GR: mean fraction of an item's keywords in a greedy answer from a prompt with both modalities, "
                      "the image only, or the text only, on held-out items (epoch 0 = before training).", ""]
    if "transfer" in st:
        lines += ["## Stage 2a: Transfer-MLLM", "", "| epoch | transition InfoNCE | L_gen |", "|---|---|---|"]
        lines += [f"| {h['epoch']} | {_f(h.get('transition'))} | {_f(h.get('gen'))} |"
                  for h in st["transfer"]["history"]]
        lines.append("")
    if "align" in st:
        lines += ["## Stage 2b: Transitional pattern alignment", "",
                  "| epoch | loss | L_gen | CLUB (min) | MINE (max) | GR both | GR image | GR text |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {h['epoch']} | {_f(h.get('loss'))} | {_f(h.get('gen'))} | {_f(h.get('club'))} | "
                  f"{_f(h.get('mine'))} | {_f(h.get('gr_both'))} | {_f(h.get('gr_image'))} | {_f(h.get('gr_text'))} |"
                  for h in st["align"]["history"]]
        lines.append("")
    if r.get("embeddings"):
        e = r["embeddings"]
        lines += [f"Embeddings: `{e['path']}` ({e['n_items']} items, dims {e.get('dims')}).", ""]
    lines += ["Time (s): " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()), ""]
    if r.get("notes"):
        lines += ["Notes: " + "; ".join(r["notes"]), ""]
    return "\n".join(lines)


def main(config_path: str | Path, overrides: Sequence[str] = (), *, stages: Sequence[str] = STAGES,
         out: str | Path | None = None, restart: bool = False) -> dict[str, Any]:
    cfg = load_tpad_config(config_path, overrides)
    if out is not None:
        cfg = cfg.model_copy(update={"out": str(out)})
    report = run_tpad(cfg, stages, restart=restart)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return report

