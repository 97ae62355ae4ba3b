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

Every stage runs in the shared stage loop (:class:`distillrec.training.stages.Stage`): checkpoints every
``save_every`` steps and at the end of each epoch, resume after a kill to the same result, a finished stage is
skipped, and a changed config with the same ``out`` is an error, not a silent mix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.dataset import Dataset
from ...data.loaders import load_dataset
from ...errors import ConfigError
from ...files import atomic_save_tensors, atomic_write_text, folder_lock, prepare_out, write_folder_atomically
from ...llm.builder import build_multimodal, multimodal_config
from ...llm.multimodal import MultimodalLM
from ...training.stages import Stage, autocast_context, seeded
from .config import KNOWLEDGE, STAGES, TRANSFER, TPADConfig, load_tpad_config
from .data import TPADData
from .keywords import generation_rate
from .model import KnowledgeHeads, TransitionalPatternAlignment, TransitionContrast, meta_pairs, similarity_distillation
from .report import render_markdown

# what a TPAD run writes into its folder: --restart removes these and nothing else
OUTPUTS = ("knowledge", "transfer", "align", "states", "model", "embeddings", "config.json", "embed_config.json",
           "report.json", "report.md")


def build_tpad_model(cfg: TPADConfig, d_image: int) -> MultimodalLM:
    """The LM named by ``cfg.lm`` with a connector and the two LoRA towers, seeded by ``cfg.lm.seed``."""
    mcfg = multimodal_config(cfg.lm, cfg.multimodal, reserved_by="the TPAD run (lm, image_features, towers)",
                             d_image=d_image, adapters=[KNOWLEDGE, TRANSFER])
    return build_multimodal(cfg.lm, mcfg, device=cfg.device)


def _set_trainable(mm: MultimodalLM, tower: str, shared: bool) -> None:
    """Make ``tower`` the active (trainable) LoRA tower; ``shared``: the connector, missing-image token and summary
    token embeddings train too (stages 1 and 2b), else they are frozen (stage 2a)."""
    mm.use_adapter(tower)
    for p in [*mm.connector.parameters(), mm.missing_image, mm.special_embed.weight]:
        p.requires_grad_(shared)


def _trainable(mm: MultimodalLM, heads: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in mm.trainable_named_parameters()] + [p for p in heads.parameters() if p.requires_grad]


def _stage(cfg: TPADConfig, name: str, out: Path, stage_id: int, device: torch.device) -> Stage:
    return Stage(name, getattr(cfg, name), out, _stage_key(cfg, name), seed=cfg.seed, stage_id=stage_id,
                 save_every=cfg.save_every, progress=cfg.progress, autocast=cfg.autocast, device=device)


def _knowledge_heads(cfg: TPADConfig, data: TPADData, d: int, views: bool = True) -> KnowledgeHeads:
    return KnowledgeHeads(d, data.d_image if data.image is not None else None,
                          None if data.text_view is None else int(data.text_view.shape[1]), cfg.d_contrast,
                          cfg.temperature, views)


# ----------------------------------------------------------------------------------------------------- the stages
def _drop_modalities(rng: np.random.Generator, n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Per item: drop the image with probability p/2, else drop the text with probability p/2 (never both)."""
    r = rng.random(n)
    return r < p / 2, (r >= p / 2) & (r < p)


def _knowledge_losses(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, heads: KnowledgeHeads, items: np.ndarray,
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
    stage = _stage(cfg, "knowledge", out, 1, mm.device)
    if (done := stage.load_finished(mm)) is not None:
        return done
    _set_trainable(mm, KNOWLEDGE, shared=True)
    heads = seeded(cfg.seed * 1000 + 1, lambda: _knowledge_heads(cfg, data, mm.hidden_size)).to(mm.device)
    opt = torch.optim.AdamW(_trainable(mm, heads), lr=k.lr, weight_decay=k.weight_decay)
    items = data.stage_items(k.max_items, 0x1)
    _save_stage_items(data, out, "knowledge", items)
    mm.train()

    def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        loss, parts = _knowledge_losses(cfg, data, mm, heads, items[idx], rng, k.modality_dropout)
        loss.backward()
        return {"loss": float(loss.detach()), **{n: float(v.detach()) for n, v in parts.items() if n != "h"}}

    return stage.run(mm, heads, [opt], len(items), step, lambda: generation_rates(cfg, data, mm, data.gr_items), log)


def stage_transfer(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, out: Path, log: Callable) -> dict[str, Any]:
    """Stage 2a; with ``towers: single`` the knowledge tower itself learns the transition task (plus L_gen)."""
    t = cfg.transfer
    stage = _stage(cfg, "transfer", out, 2, mm.device)
    if (done := stage.load_finished(mm)) is not None:
        return done
    single = cfg.towers == "single"
    tower = KNOWLEDGE if single else TRANSFER
    _set_trainable(mm, tower, shared=single)
    d2 = 2 * mm.hidden_size
    heads = seeded(cfg.seed * 1000 + 2, lambda: nn.ModuleDict({
        "transition": TransitionContrast(d2, cfg.d_contrast, cfg.temperature)})).to(mm.device)
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
    no_views = _knowledge_heads(cfg, data, mm.hidden_size, views=False)
    held, held_ctx = data.heldout_pairs(t.heldout_pairs)
    held_ctx = [c[-t.context_items:] if t.context_items else [] for c in held_ctx]

    @torch.no_grad()
    def heldout_retrieval() -> dict[str, Any]:
        """The transition head's retrieval of each held-out target among all held-out targets."""
        if len(held) < 2:
            return {}
        a = _states(cfg, data, mm, held[:, 0], tower, t.instruction, texts=data.pair_texts(held, held_ctx))
        p = _states(cfg, data, mm, held[:, 1], tower, t.instruction)
        r = heads["transition"].retrieval(a.to(mm.device), p.to(mm.device), torch.from_numpy(held[:, 1]))
        return {f"heldout_{k}": v for k, v in r.items()}

    mm.train()

    def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        p = pairs[idx]
        both = np.concatenate([p[:, 0], p[:, 1]])
        img, mask = data.images(both)
        texts = data.pair_texts(p, [contexts[i] for i in idx] if contexts else None) + \
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

    return stage.run(mm, heads, [opt], len(pairs), step, heldout_retrieval if len(held) >= 2 else None, log)


@torch.no_grad()
def _states(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, items: np.ndarray, tower: str,
            instruction: str | None = None, desc: str | None = None, texts: list[str] | None = None
            ) -> torch.Tensor:
    """``[s_img; s_txt]`` of ``items`` from ``tower`` (float32, CPU), in eval mode, under the run's autocast;
    ``texts``: one prompt text per item instead of the item's own (e.g. with its session context)."""
    from tqdm.auto import tqdm

    was = mm.training
    mm.eval()
    rows = []
    for s in tqdm(range(0, len(items), cfg.embed_batch_size), desc=desc, disable=not (cfg.progress and desc),
                  leave=False):
        chunk = items[s:s + cfg.embed_batch_size]
        img, mask = data.images(chunk)
        with autocast_context(cfg.autocast, mm.device):
            chunk_texts = texts[s:s + len(chunk)] if texts is not None else [data.texts[i] for i in chunk]
            o = mm.embed(chunk_texts, img, adapter=tower, image_mask=mask, instruction=instruction)
        rows.append(torch.cat([o["image"], o["text"]], -1).float().cpu())
    mm.train(was)
    return torch.cat(rows)


def item_states(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, out: Path, name: str, tower: str,
                instruction: str | None = None) -> torch.Tensor:
    """Every item's ``[s_img; s_txt]`` from ``tower`` as it is now, ``[n_items + 1, 2d]`` (row 0 = padding),
    computed once per run folder (``<out>/states/<name>.safetensors``)."""
    from safetensors.torch import load_file

    path = out / "states" / f"{name}.safetensors"
    if path.is_file():
        return load_file(str(path))["states"]
    items = np.arange(1, data.ds.n_items + 1)
    body = _states(cfg, data, mm, items, tower, instruction, desc=f"{name} states")
    states = torch.cat([torch.zeros(1, body.shape[1]), body])
    atomic_save_tensors(path, {"states": states})
    return states


def _save_stage_items(data: TPADData, out: Path, stage: str, items: np.ndarray) -> None:
    import json

    atomic_write_text(out / stage / "items.json",
                      json.dumps([data.ds.items.ids[int(i) - 1] for i in items]))


def stage_align(cfg: TPADConfig, data: TPADData, mm: MultimodalLM, out: Path, log: Callable) -> dict[str, Any]:
    a = cfg.align
    stage = _stage(cfg, "align", out, 3, mm.device)
    if (done := stage.load_finished(mm)) is not None:
        return done
    items = data.stage_items(a.max_items, 0x3)
    _save_stage_items(data, out, "align", items)
    t_states = item_states(cfg, data, mm, out, "transfer", TRANSFER, cfg.transfer.instruction)[torch.from_numpy(items)]
    _set_trainable(mm, KNOWLEDGE, shared=True)
    d = mm.hidden_size

    heads = seeded(cfg.seed * 1000 + 3, lambda: nn.ModuleDict({
        "views": _knowledge_heads(cfg, data, d),
        "tpa": TransitionalPatternAlignment(2 * d, 2 * d, a.d_proj, a.estimator_hidden, a.club, a.mine_ma_rate,
                                            a.lower_bound, cfg.temperature)})).to(mm.device)
    # the stage-1 contrastive heads continue from stage 1
    k_heads = out / "knowledge" / "final" / "heads.safetensors"
    if k_heads.is_file():
        from safetensors.torch import load_file

        sd = {k.removeprefix("model."): v for k, v in load_file(str(k_heads)).items() if k.startswith("model.")}
        heads["views"].load_state_dict(sd)
    tpa: TransitionalPatternAlignment = heads["tpa"]
    view_heads: KnowledgeHeads = heads["views"]
    est_params = tpa.estimator_parameters()
    if a.freeze_dt:  # the Transfer side stays as seeded: only the Knowledge side can move towards it
        tpa.D_T.requires_grad_(False)
    est_ids = {id(p) for p in est_params}
    main_params = [p for p in _trainable(mm, heads) if id(p) not in est_ids]
    opt = torch.optim.AdamW(main_params, lr=a.lr, weight_decay=a.weight_decay)
    est_opt = torch.optim.Adam(est_params, lr=a.estimator_lr)
    nearest = _nearest_in(t_states, 2 * (a.neighbour_batches - 1)) if a.neighbour_batches > 1 else None
    mm.train()

    def step(idx: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        if nearest is not None:  # anchors and some of their nearest items in t (indices into the stage items)
            k = a.neighbour_batches
            anchors = idx[: max(1, len(idx) // k)]
            picks = [rng.choice(nearest[i], k - 1, replace=False) for i in anchors]
            idx = np.concatenate([anchors, *picks])[: len(idx)]
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
        extra = {}
        if a.gamma3 > 0:
            sd = similarity_distillation(parts["h"], t, cfg.temperature)
            total = total + a.gamma3 * sd
            extra["similarity"] = float(sd.detach())
        total.backward()
        est_opt.zero_grad(set_to_none=True)  # the encoder step must not leak into the estimators
        return {"loss": float(total.detach()), **{n: float(v.detach()) for n, v in parts.items() if n != "h"},
                "club": float(mi["club"].detach()), "mine": float(mi["mine"].detach()), **extra}

    # no epoch-0 evaluation: it would repeat stage 1's last one
    return stage.run(mm, heads, [opt, est_opt], len(items), step,
                     lambda: generation_rates(cfg, data, mm, data.gr_items), log, evaluate_before=False)


def _nearest_in(states: torch.Tensor, m: int) -> np.ndarray:
    """``[n, m]``: each row's ``m`` nearest other rows by cosine over standardised columns (the probe's similarity)."""
    from ...evaluation.probe import standardised_unit_rows

    z = torch.from_numpy(standardised_unit_rows(np.concatenate([np.zeros((1, states.shape[1]), np.float32),
                                                                states.float().numpy()]))[1:])
    sims = z @ z.t()
    sims.fill_diagonal_(-float("inf"))
    return sims.topk(min(m, len(z) - 1), dim=1).indices.numpy()


def _stage_key(cfg: TPADConfig, stage: str) -> dict[str, Any]:
    """What a stage's result depends on: the shared settings, its own block and every earlier stage's."""
    shared = cfg.model_dump(mode="json", include={"dataset", "lm", "multimodal", "image_features", "text_fields",
                                                  "text_view", "use_image", "use_text", "towers", "contrast_weight",
                                                  "temperature", "d_contrast", "keywords", "seed"})
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
    import json

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    cfg.apply()
    out = prepare_out(Path(cfg.out), OUTPUTS, restart=restart, marker="config.json")
    atomic_write_text(out / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=1))
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
        mm = build_tpad_model(cfg, data.d_image)
        report["seconds"]["load_lm"] = round(time.perf_counter() - t0, 2)
        report["trainable_lm_parameters"] = {
            "connector": sum(p.numel() for p in mm.connector.parameters()),
            "lora_per_tower": sum(p.numel() for n, p in mm.named_parameters() if f"lora_A.{KNOWLEDGE}" in n
                                  or f"lora_B.{KNOWLEDGE}" in n)}
        runners = {"knowledge": stage_knowledge, "transfer": stage_transfer, "align": stage_align}
        for s in need:
            t0 = time.perf_counter()
            report["stages"][s] = _summary(runners[s](cfg, data, mm, out, log))
            if cfg.probe and s == "knowledge":  # the Knowledge embedding before stage 2b, for the probe
                item_states(cfg, data, mm, out, "knowledge_stage1", KNOWLEDGE)
            if cfg.probe and s == "transfer" and cfg.towers == "two":
                item_states(cfg, data, mm, out, "transfer", TRANSFER, cfg.transfer.instruction)
            report["seconds"][s] = round(time.perf_counter() - t0, 2)
        write_folder_atomically(out / "model", mm.save_trainable)
    if "embed" in stages:
        t0 = time.perf_counter()
        report["embeddings"] = embed_with_knowledge_tower(cfg, out)
        if cfg.align.export == "h_dl" and cfg.towers == "two":
            report["embeddings"]["dims"]["distilled"] = export_distilled(cfg, out)
        report["seconds"]["embed"] = round(time.perf_counter() - t0, 2)
        if cfg.probe:
            t0 = time.perf_counter()
            ds = dataset if dataset is not None else (data.ds if need else load_dataset(cfg.dataset))
            report["probe"] = transition_probes(cfg, ds, out)
            if cfg.probe_mi:
                report["mi_to_transfer"] = mi_to_transfer(out, cfg.seed)
            report["seconds"]["probe"] = round(time.perf_counter() - t0, 2)
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


@torch.no_grad()
def export_distilled(cfg: TPADConfig, out: Path) -> int:
    """Add ``distilled`` = D_L([h_img; h_txt]) (stage 2b's projector, eval mode) to the exported embeddings file
    (feature ``tpad_distilled`` when attached); returns its width."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ...data.embeddings import EMBEDDINGS_FILE

    heads_file = out / "align" / "final" / "heads.safetensors"
    if not heads_file.is_file():
        raise ConfigError(f"align.export: h_dl needs stage 2b's result ({heads_file}); run the align stage")
    path = out / "embeddings" / EMBEDDINGS_FILE
    emb = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    a = cfg.align
    d2 = emb["image"].shape[1] + emb["text"].shape[1]
    tpa = TransitionalPatternAlignment(d2, d2, a.d_proj, a.estimator_hidden, a.club, a.mine_ma_rate, a.lower_bound,
                                       cfg.temperature)
    sd = {k.removeprefix("model.tpa."): v for k, v in load_file(str(heads_file)).items()
          if k.startswith("model.tpa.")}
    tpa.load_state_dict(sd)
    tpa.eval()
    h = torch.cat([emb["image"], emb["text"]], 1)
    distilled = tpa.D_L(h)
    distilled[0] = 0.0  # padding row
    emb["distilled"] = distilled.contiguous()
    atomic_save_tensors(path, emb, meta)
    return int(distilled.shape[1])


def transition_probes(cfg: TPADConfig, ds: Dataset, out: Path) -> dict[str, Any]:
    """The transition probe (:mod:`distillrec.evaluation.probe`) of every item representation the run has: the raw
    image feature and text view, the Transfer states, the exported Knowledge embedding after stage 1 and the final
    export (after stage 2b)."""
    from safetensors.numpy import load_file

    from ...data.embeddings import EMBEDDINGS_FILE
    from ...evaluation.probe import probe_table

    emb: dict[str, np.ndarray] = {}
    if cfg.use_image and cfg.image_features in ds.items.features:
        emb[f"raw {cfg.image_features}"] = ds.items.features[cfg.image_features]
    if cfg.use_text and cfg.text_view and cfg.text_view in ds.items.features:
        emb[f"raw {cfg.text_view}"] = ds.items.features[cfg.text_view]
    if len(emb) == 2:
        emb["raw both"] = np.concatenate(list(emb.values()), 1)
    states = {n: out / "states" / f"{f}.safetensors" for n, f in (("transfer states", "transfer"),
                                                                   ("knowledge after stage 1", "knowledge_stage1"))}
    for name, path in states.items():
        if path.is_file():
            emb[name] = load_file(str(path))["states"]
    final = load_file(str(out / "embeddings" / EMBEDDINGS_FILE))
    emb["exported (final)"] = np.concatenate([final["image"], final["text"]], 1)
    if "distilled" in final:
        emb["exported D_L(h)"] = final["distilled"]
    return probe_table(emb, ds)


def mi_to_transfer(out: Path, seed: int = 0) -> dict[str, dict[str, float]]:
    """Fresh MINE / vCLUB estimates (:func:`~.mutual_information.fitted_mi_estimates`) of the MI between the Transfer
    states and the Knowledge embedding after stage 1, the final export and D_L(h), over every item: whether the
    alignment put transition information into what is exported, not only into stage 2b's projectors. Empty without
    the Transfer states (one tower)."""
    from safetensors.torch import load_file

    from ...data.embeddings import EMBEDDINGS_FILE
    from .mutual_information import fitted_mi_estimates

    t_path = out / "states" / "transfer.safetensors"
    if not t_path.is_file():
        return {}
    t = load_file(str(t_path))["states"][1:]
    reps: dict[str, torch.Tensor] = {}
    k1 = out / "states" / "knowledge_stage1.safetensors"
    if k1.is_file():
        reps["knowledge after stage 1"] = load_file(str(k1))["states"][1:]
    final = load_file(str(out / "embeddings" / EMBEDDINGS_FILE))
    reps["exported (final)"] = torch.cat([final["image"], final["text"]], 1)[1:]
    if "distilled" in final:
        reps["exported D_L(h)"] = final["distilled"][1:]
    return {name: fitted_mi_estimates(x, t, seed=seed) for name, x in reps.items()}


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    return {"steps": state.get("step"), "history": state.get("history", []), "curve": state.get("curve", []),
            "seconds": state.get("seconds")}


def embed_with_knowledge_tower(cfg: TPADConfig, out: Path) -> dict[str, Any]:
    """``distillrec embed`` with the final Knowledge tower (``<out>/model``) -> ``<out>/embeddings``."""
    import json

    from ...training.embed import EmbedConfig, embed_items

    model = out / "model"
    if not (model / "config.json").is_file():
        raise ConfigError(f"{model} not found: run the training stages first (distillrec tpad CONFIG)")
    ecfg = EmbedConfig(dataset=cfg.dataset, lm=cfg.lm, pretrained=str(model), adapter=KNOWLEDGE,
                       image_features=cfg.image_features if cfg.use_image else None,
                       text_fields=cfg.text_fields if cfg.use_text else [], batch_size=cfg.embed_batch_size,
                       shard_size=512, num_threads=cfg.num_threads, device=cfg.device, progress=cfg.progress)
    atomic_write_text(out / "embed_config.json", json.dumps(ecfg.model_dump(mode="json"), indent=1))
    return embed_items(ecfg, out / "embeddings")


def main(config_path: str | Path | dict[str, Any], overrides: Sequence[str] = (), *,
         stages: Sequence[str] = STAGES, out: str | Path | None = None, restart: bool = False) -> dict[str, Any]:
    cfg = load_tpad_config(config_path, overrides)
    if out is not None:
        cfg = cfg.model_copy(update={"out": str(out)})
    with folder_lock(cfg.out):  # released when the run returns, not when the process ends
        report = run_tpad(cfg, stages, restart=restart)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return report
