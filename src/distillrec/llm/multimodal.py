"""A multimodal LM: frozen causal LM + trainable visual connector + ``<IMG_SUM>``/``<TEXT_SUM>`` + two LoRA towers.

The item prompt (DESIGN.md, TPAD steps 1-2) is, inside the tokenizer's chat template (plain text when it has none)::

    {instruction}
    Image: [soft image tokens]<IMG_SUM>
    Text: {item text}<TEXT_SUM>

and the final hidden states (last layer, after the final norm) at ``<IMG_SUM>`` and ``<TEXT_SUM>`` are the item's image
and text embeddings. Attention is causal, so ``<IMG_SUM>`` sees the instruction and the image, ``<TEXT_SUM>`` sees
everything before it.

Trainable parts, and nothing else (the base LM, including its resized embedding matrix, stays frozen):

* the connector: ``"qformer"`` (Q-Former-lite: ``n_query`` learned queries, self-attention + cross-attention over the
  image feature tokens + FFN, 1-2 layers, then a Linear to the LM width) or ``"mlp"`` (LLaVA-1.5 style 2-layer MLP per
  feature token; one soft token per feature token);
* ``missing_image``: one learned soft token used *instead of* the image tokens for an item without an image (the prompt
  keeps its shape, and ``<IMG_SUM>`` then reads a learned "no image" state);
* ``special_embed``: a 2-row ``nn.Embedding`` for ``<IMG_SUM>``/``<TEXT_SUM>``, substituted into the input embeddings
  (the two new rows of the LM's own, resized, embedding matrix are never read on input; they only make the vocabulary
  consistent for the output layer, and generation never emits them);
* LoRA adapters (peft), one per name in ``config.adapters`` (default ``"knowledge"`` and ``"transfer"``), all on the
  same frozen base loaded once; ``use_adapter(name)`` switches, ``adapter="base"`` runs the LM with LoRA disabled.

Checkpoints hold only the trainable parts: ``config.json`` + ``connector.safetensors`` + ``lora_<name>.safetensors``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

IMAGE_TOKEN = "<image>"  # placeholder for the soft image tokens in a prompt string (never given to the tokenizer)
BASE = "base"  # adapter name meaning "LoRA disabled"
_IMAGE_SLOT = -1  # sentinel id for a soft-token position while building a batch
_FORMAT = 1


class MultimodalLMConfig(BaseModel):
    """Plain-data configuration of a :class:`MultimodalLM` (the base model itself is passed in or named by ``base``)."""

    model_config = ConfigDict(extra="forbid")

    base: str = "smollm2-135m-instruct"  # used by from_pretrained() when no model is passed
    dtype: str = "float32"
    num_layers: int | None = Field(None, ge=1)  # keep the first N decoder layers (CPU speed); None: all
    d_image: int = 1280  # width of the image feature tokens
    connector: Literal["qformer", "mlp"] = "qformer"
    n_query: int = Field(8, ge=1)
    qformer_layers: int = Field(2, ge=1, le=4)
    qformer_dim: int = Field(256, ge=8)
    qformer_heads: int = Field(4, ge=1)
    max_image_tokens: int = Field(256, ge=1)  # learned positions of the feature tokens (Q-Former input)
    mlp_hidden: int | None = None  # default: the LM width
    connector_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    adapters: list[str] = Field(default_factory=lambda: ["knowledge", "transfer"])
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = 16.0
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    img_sum_token: str = "<IMG_SUM>"
    text_sum_token: str = "<TEXT_SUM>"
    use_chat_template: bool = True  # when the tokenizer has one
    system_prompt: str | None = None  # None: the chat template's own default
    instruction: str = "Read the item below and summarise its image and its text."
    item_template: str = "{instruction}\nImage: {image}{img_sum}\nText: {text}{text_sum}"
    caption_prompt: str = "Image: {image}\nDescribe this item in a few words."
    max_text_tokens: int = Field(128, ge=1)
    padding_side: Literal["left", "right"] = "right"

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("adapter names must be unique")
        for name in v:
            if name == BASE or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"invalid adapter name {name!r} ('{BASE}' is reserved; use letters, digits, _ or -)")
        return v

    @model_validator(mode="after")
    def _templates(self) -> MultimodalLMConfig:
        keys = ["{image}", "{img_sum}", "{text}", "{text_sum}"]
        pos = [self.item_template.find(k) for k in keys]
        if min(pos) < 0 or pos != sorted(pos):
            raise ValueError(f"item_template must contain {', '.join(keys)} in this order")
        if self.img_sum_token == self.text_sum_token:
            raise ValueError("img_sum_token and text_sum_token must differ")
        return self


# ----------------------------------------------------------------------------------------------------------- connectors
class _QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.n1, self.n2, self.n3, self.nkv = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor | None) -> torch.Tensor:
        h = self.n1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kvn = self.nkv(kv)
        q = q + self.cross_attn(self.n2(q), kvn, kvn, key_padding_mask=kv_pad, need_weights=False)[0]
        return q + self.ffn(self.n3(q))


class QFormerLite(nn.Module):
    """``n_query`` learned queries attend (pre-norm self-attention, cross-attention, FFN) over the projected image
    feature tokens; a Linear maps them to the LM width. ``[N, T, d_image] -> [N, n_query, d_lm]``."""

    def __init__(self, d_image: int, d_lm: int, n_query: int, dim: int, layers: int, heads: int, dropout: float,
                 max_tokens: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"qformer_dim={dim} must be divisible by qformer_heads={heads}")
        self.in_proj = nn.Sequential(nn.LayerNorm(d_image), nn.Linear(d_image, dim))
        self.pos = nn.Parameter(torch.zeros(max_tokens, dim))
        self.queries = nn.Parameter(torch.randn(n_query, dim) * 0.02)
        self.layers = nn.ModuleList(_QFormerLayer(dim, heads, dropout) for _ in range(layers))
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, d_lm)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, feats: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, _ = feats.shape
        if t > self.pos.shape[0]:
            raise ValueError(f"{t} image feature tokens > max_image_tokens={self.pos.shape[0]}")
        kv = self.in_proj(feats) + self.pos[:t]
        q = self.queries.unsqueeze(0).expand(n, -1, -1)
        for layer in self.layers:
            q = layer(q, kv, pad_mask)
        return self.out(self.out_norm(q))

    @property
    def out_layer(self) -> nn.Linear:
        return self.out


class MLPConnector(nn.Module):
    """LLaVA-1.5 style projector: a 2-layer MLP applied to each feature token. ``[N, T, d_image] -> [N, T, d_lm]``."""

    def __init__(self, d_image: int, d_lm: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_image), nn.Linear(d_image, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, d_lm))

    def forward(self, feats: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(feats)

    @property
    def out_layer(self) -> nn.Linear:
        return self.net[-1]


# ------------------------------------------------------------------------------------------------------------ losses
def answer_only_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Causal LM cross-entropy: position ``i`` predicts ``labels[i + 1]``; labels ``-100`` are ignored.
    ``reduction="mean"`` averages over all counted tokens of the batch; ``"sum"``; ``"none"`` gives ``[B]`` sums."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(shift_labels.shape)
    if reduction == "none":
        return tok.sum(1)
    if reduction == "sum":
        return tok.sum()
    n = (shift_labels != -100).sum()
    return tok.sum() / n.clamp(min=1)


# ------------------------------------------------------------------------------------------------------------ the model
class MultimodalLM(nn.Module):
    """See the module docstring. ``MultimodalLM(tokenizer, model, config)`` mutates ``tokenizer`` (adds the two special
    tokens) and ``model`` (embeddings resized when needed, frozen, LoRA layers injected)."""

    def __init__(self, tokenizer: Any, model: nn.Module, config: MultimodalLMConfig | dict | None = None):
        super().__init__()
        cfg = config if isinstance(config, MultimodalLMConfig) else MultimodalLMConfig(**(config or {}))
        self.config = cfg
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if cfg.num_layers is not None:
            from .backbone import truncate_layers

            truncate_layers(model, cfg.num_layers)
        model.requires_grad_(False)
        emb_layer = model.get_input_embeddings()
        d = emb_layer.embedding_dim
        self.hidden_size = d

        # special tokens: added to the tokenizer, rows of the (frozen) LM matrix exist, trainable copies live here
        specials = [cfg.img_sum_token, cfg.text_sum_token]
        tokenizer.add_tokens(specials, special_tokens=True)
        self.special_ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
        with torch.no_grad():
            w = emb_layer.weight
            n_old = w.shape[0]
            # statistics on the CPU: the initial values are drawn there (seeded), whatever device the LM is on
            mean, std = w.float().mean(0).cpu(), w.float().std().item()
            if max(self.special_ids) >= n_old:
                model.resize_token_embeddings(max(len(tokenizer), max(self.special_ids) + 1), mean_resizing=False)
                model.requires_grad_(False)
                w = model.get_input_embeddings().weight
            gen = torch.Generator().manual_seed(0)
            init = mean.unsqueeze(0) + 0.1 * std * torch.randn(len(specials), d, generator=gen)
            for k, tid in enumerate(self.special_ids):
                if tid >= n_old:
                    w[tid] = init[k].to(w.device, w.dtype)
        self.special_embed = nn.Embedding(len(specials), d)
        with torch.no_grad():
            self.special_embed.weight.copy_(init)
        self._emb_std = std

        # visual connector (+ the learned "missing image" soft token)
        if cfg.connector == "qformer":
            self.connector: nn.Module = QFormerLite(cfg.d_image, d, cfg.n_query, cfg.qformer_dim, cfg.qformer_layers,
                                                    cfg.qformer_heads, cfg.connector_dropout, cfg.max_image_tokens)
        else:
            self.connector = MLPConnector(cfg.d_image, d, cfg.mlp_hidden or d, cfg.connector_dropout)
        with torch.no_grad():  # soft tokens start at the scale of the LM's own token embeddings
            out = self.connector.out_layer
            nn.init.normal_(out.weight, std=std / math.sqrt(out.in_features))
            nn.init.zeros_(out.bias)
        self.missing_image = nn.Parameter((mean + 0.1 * std * torch.randn(d, generator=gen)).unsqueeze(0))

        # LoRA towers on one base
        self.peft = None
        if cfg.adapters:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
            pm = get_peft_model(model, lcfg, adapter_name=cfg.adapters[0])
            for name in cfg.adapters[1:]:
                pm.add_adapter(name, lcfg)
            pm.set_adapter(cfg.adapters[0])
            self.peft = pm
            self.backbone: nn.Module = pm
        else:
            self.backbone = model
        object.__setattr__(self, "lm", model)  # the HF model itself (LoRA layers inside); not registered twice
        dev = next(model.parameters()).device
        for m in (self.connector, self.special_embed):
            m.to(dev)
        self.missing_image.data = self.missing_image.data.to(dev)

    # ---------------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: MultimodalLMConfig | dict | None = None, **load_kwargs: Any) -> MultimodalLM:
        """Load the base named by ``config.base`` (``load_causal_lm``) and build on it."""
        from .backbone import load_causal_lm

        cfg = config if isinstance(config, MultimodalLMConfig) else MultimodalLMConfig(**(config or {}))
        tok, model = load_causal_lm(cfg.base, cfg.dtype, **load_kwargs)
        return cls(tok, model, cfg)

    # ------------------------------------------------------------------------------------------------------- adapters
    @property
    def device(self) -> torch.device:
        return self.special_embed.weight.device

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def active_adapter(self) -> str | None:
        if self.peft is None:
            return None
        a = self.peft.active_adapter
        return a[0] if isinstance(a, list | tuple) else a

    def use_adapter(self, name: str) -> None:
        """Make ``name`` the active LoRA tower (its parameters trainable, the other towers' frozen)."""
        if self.peft is None:
            raise ValueError("this MultimodalLM has no LoRA adapters (config.adapters is empty)")
        if name not in self.config.adapters:
            raise KeyError(f"unknown adapter {name!r}; have {self.config.adapters}")
        self.peft.set_adapter(name)

    @contextmanager
    def adapter_scope(self, adapter: str | None) -> Iterator[None]:
        """``None``: the active adapter; ``"base"``: LoRA disabled; a name: that adapter for the block only."""
        if adapter is None or (self.peft is None and adapter == BASE):
            yield
        elif self.peft is None:
            raise ValueError(f"adapter {adapter!r} requested but this MultimodalLM has no LoRA adapters")
        elif adapter == BASE:
            with self.peft.disable_adapter():
                yield
        else:
            prev = self.active_adapter
            if adapter != prev:
                self.use_adapter(adapter)
            try:
                yield
            finally:
                if adapter != prev and prev is not None:
                    self.peft.set_adapter(prev)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------------- prompts
    def _clean(self, text: str) -> str:
        for s in (self.config.img_sum_token, self.config.text_sum_token, IMAGE_TOKEN):
            text = text.replace(s, " ")
        return text

    def item_prompt(self, text: str, instruction: str | None = None) -> str:
        """The user-turn content for one item; ``<image>`` marks where the soft image tokens go."""
        text = self._clean(text or "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.config.max_text_tokens:
            text = self.tokenizer.decode(ids[: self.config.max_text_tokens])
        return self.config.item_template.format(
            instruction=self.config.instruction if instruction is None else instruction,
            image=IMAGE_TOKEN, img_sum=self.config.img_sum_token, text=text, text_sum=self.config.text_sum_token)

    def format_prompt(self, content: str) -> str:
        """Wrap user content in the chat template (generation prompt added) or, without one, return it as is."""
        tok = self.tokenizer
        if self.config.use_chat_template and getattr(tok, "chat_template", None):
            msgs = []
            if self.config.system_prompt is not None:
                msgs.append({"role": "system", "content": self.config.system_prompt})
            msgs.append({"role": "user", "content": content})
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return content + "\n"

    def _uses_chat(self) -> bool:
        return bool(self.config.use_chat_template and getattr(self.tokenizer, "chat_template", None))

    def _prompt_ids(self, content: str, n_soft: int | None) -> list[int]:
        """Token ids of the formatted prompt, with ``n_soft`` sentinel slots where ``<image>`` is. A prompt without
        ``<image>`` given an image gets the image tokens at its start (LLaVA convention)."""
        formatted = self.format_prompt(content)
        parts = formatted.split(IMAGE_TOKEN)
        if len(parts) > 2:
            raise ValueError(f"a prompt may hold at most one {IMAGE_TOKEN}")
        tok = self.tokenizer
        ids: list[int] = []
        if not self._uses_chat() and tok.bos_token_id is not None:
            ids.append(tok.bos_token_id)
        if len(parts) == 1 and n_soft:
            ids += [_IMAGE_SLOT] * n_soft
        for i, part in enumerate(parts):
            if i > 0:
                ids += [_IMAGE_SLOT] * (n_soft or 0)
            if part:
                ids += tok(part, add_special_tokens=False)["input_ids"]
        return ids

    # ---------------------------------------------------------------------------------------------------- image path
    def image_tokens(self, image_features: torch.Tensor | Sequence[torch.Tensor | None] | None, n: int,
                     image_mask: torch.Tensor | Sequence[bool] | None = None) -> list[torch.Tensor]:
        """Soft tokens per item: ``[n_soft, d]`` (the connector's output) or ``[1, d]`` (``missing_image``) for an
        item without image. ``image_features``: ``[N, T, d_image]``, ``[N, d_image]`` (one token), a list of such
        per-item tensors or ``None`` entries, or ``None`` (no item has an image). ``image_mask``: ``[N]`` bool."""
        missing = self.missing_image
        out: list[torch.Tensor | None] = [None] * n
        if image_features is not None:
            if isinstance(image_features, torch.Tensor):
                if image_features.shape[0] != n:
                    raise ValueError(f"{image_features.shape[0]} image feature rows for {n} items")
                feats = [image_features[i] for i in range(n)]
            else:
                feats = list(image_features)
                if len(feats) != n:
                    raise ValueError(f"{len(feats)} image feature entries for {n} items")
            mask = [f is not None for f in feats]
            if image_mask is not None:
                mask = [a and bool(b) for a, b in zip(mask, list(image_mask), strict=True)]
            rows = [i for i in range(n) if mask[i]]
            groups: dict[tuple[int, ...], list[int]] = {}
            for i in rows:
                f = feats[i]
                if f.dim() == 1:
                    f = f.unsqueeze(0)
                feats[i] = f
                if f.dim() != 2 or f.shape[-1] != self.config.d_image:
                    raise ValueError(f"item {i}: image features of shape {tuple(f.shape)}, expected [T, "
                                     f"{self.config.d_image}] or [{self.config.d_image}]")
                groups.setdefault(tuple(f.shape), []).append(i)
            for idx in groups.values():
                x = torch.stack([feats[i] for i in idx]).to(self.device, torch.float32)
                y = self.connector(x)
                for j, i in enumerate(idx):
                    out[i] = y[j]
        return [missing if t is None else t for t in out]

    # ------------------------------------------------------------------------------------------------------ batching
    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (``_IMAGE_SLOT`` rows are zeros-to-be-filled), special tokens substituted."""
        safe = ids.clamp(min=0)
        emb = self.lm.get_input_embeddings()(safe)
        for k, tid in enumerate(self.special_ids):
            emb = torch.where((ids == tid).unsqueeze(-1), self.special_embed.weight[k].to(emb.dtype), emb)
        return emb

    def encode(self, contents: Sequence[str], image_features: Any = None, image_mask: Any = None,
               answers: Sequence[str] | None = None, padding_side: str | None = None,
               add_eos: bool = True) -> dict[str, Any]:
        """Build a padded batch: ``inputs_embeds [B, L, d]``, ``attention_mask``, ``position_ids`` (counted over real
        tokens, so left and right padding give the same positions), ``input_ids`` (``-1`` at soft tokens, pad id at
        padding), ``labels`` when ``answers`` are given (answer tokens + eos; ``-100`` elsewhere, soft tokens and
        padding included), and ``lengths``."""
        n = len(contents)
        if image_features is not None:
            soft = self.image_tokens(image_features, n, image_mask)
        else:
            soft = [self.missing_image] * n
        has_slot = [IMAGE_TOKEN in c for c in contents]
        seqs, labs = [], []
        for i, c in enumerate(contents):
            real_image = image_features is not None and soft[i] is not self.missing_image
            n_soft = soft[i].shape[0] if (has_slot[i] or real_image) else 0
            if not has_slot[i] and not real_image:
                soft[i] = soft[i][:0]
            p = self._prompt_ids(c, n_soft)
            lab = [-100] * len(p)
            if answers is not None:
                a = self.tokenizer(answers[i], add_special_tokens=False)["input_ids"]
                if add_eos and self.tokenizer.eos_token_id is not None:
                    a = a + [self.tokenizer.eos_token_id]
                p, lab = p + a, lab + a
            seqs.append(p)
            labs.append(lab)
        side = padding_side or self.config.padding_side
        L = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((n, L), pad, dtype=torch.long)
        labels = torch.full((n, L), -100, dtype=torch.long)
        attn = torch.zeros((n, L), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            labels[i, sl] = torch.tensor(lab)
            attn[i, sl] = 1
        ids, labels, attn = ids.to(self.device), labels.to(self.device), attn.to(self.device)
        emb = self._embed_ids(ids)
        slot = (ids == _IMAGE_SLOT).unsqueeze(-1)
        if slot.any():
            src = torch.cat([t for t in soft if t.shape[0]], 0).to(emb.dtype)
            emb = emb.masked_scatter(slot, src)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = {"inputs_embeds": emb, "attention_mask": attn, "position_ids": pos, "input_ids": ids,
               "lengths": torch.tensor([len(s) for s in seqs])}
        if answers is not None:
            out["labels"] = labels
        return out

    def _decoder(self) -> nn.Module:
        dec = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else None
        return dec if dec is not None else getattr(self.lm, self.lm.base_model_prefix)

    # ------------------------------------------------------------------------------------------------------ embedding
    def embed(self, texts: Sequence[str], image_features: Any = None, adapter: str | None = None,
              image_mask: Any = None, instruction: str | None = None,
              answers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Item embeddings ``{"image": [N, d], "text": [N, d]}`` (float32): the final hidden states at ``<IMG_SUM>``
        and ``<TEXT_SUM>``. Gradients flow when enabled (wrap in ``torch.no_grad()`` for inference).

        With ``answers`` the same forward pass also gives ``"lm_loss"``: the answer-only LM loss (token mean) of the
        answers written after the item prompt. Attention is causal, so the summary states do not see the answer and
        equal those of a pass without it; the output layer runs on the answer positions only (a vocabulary-sized
        matrix product per prompt token would cost more than the LM layers of a truncated model)."""
        contents = [self.item_prompt(t, instruction) for t in texts]
        if image_features is None:
            image_features = [None] * len(contents)
        b = self.encode(contents, image_features, image_mask, answers=answers)
        ids = b["input_ids"]
        pos = []
        for tid in self.special_ids:
            hit = ids == tid
            if not bool(hit.any(1).all()):
                raise RuntimeError("a special summary token was lost while building the prompt")
            # the last occurrence in each row
            L = ids.shape[1]
            pos.append((L - 1) - hit.flip(1).float().argmax(1))
        with self.adapter_scope(adapter):
            h = self._decoder()(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                                position_ids=b["position_ids"], use_cache=False).last_hidden_state
        rows = torch.arange(ids.shape[0], device=ids.device)
        out = {"image": h[rows, pos[0]].float(), "text": h[rows, pos[1]].float()}
        if answers is not None:
            target = b["labels"][:, 1:]
            keep = target != -100
            logits = self.lm.get_output_embeddings()(h[:, :-1][keep])
            out["lm_loss"] = F.cross_entropy(logits.float(), target[keep]) if keep.any() else h.sum() * 0.0
        return out

    # ------------------------------------------------------------------------------------------------------- LM loss
    def lm_loss(self, prompts: Sequence[str], answers: Sequence[str], image_features: Any = None,
                adapter: str | None = None, image_mask: Any = None, reduction: str = "mean",
                add_eos: bool = True) -> torch.Tensor:
        """Causal LM loss on the answer tokens (+ eos with ``add_eos``) only: the prompt's tokens are never targets.
        ``prompts`` are user-turn contents (use ``item_prompt(text)`` for the item prompt, or any string; ``<image>``
        marks the soft image tokens). The output layer runs on the positions that predict an answer token only (the
        same numbers as :func:`answer_only_loss` on the full logits, without a vocabulary-sized product per prompt
        token). ``reduction``: ``"mean"`` over the batch's answer tokens, ``"sum"``, or ``"none"`` (per-row sums)."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers")
        b = self.encode(prompts, image_features, image_mask, answers=answers, add_eos=add_eos)
        with self.adapter_scope(adapter):
            h = self._decoder()(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                                position_ids=b["position_ids"], use_cache=False).last_hidden_state
        target = b["labels"][:, 1:]
        keep = target != -100
        logits = self.lm.get_output_embeddings()(h[:, :-1][keep]).float()
        tok = F.cross_entropy(logits, target[keep], reduction="none")
        if reduction == "none":
            rows = keep.nonzero()[:, 0]
            return torch.zeros(len(prompts), device=tok.device, dtype=tok.dtype).index_add(0, rows, tok)
        if reduction == "sum":
            return tok.sum()
        return tok.sum() / keep.sum().clamp(min=1)

    # ---------------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, image_features: Any = None, prompt: str | Sequence[str] | None = None,
                 max_new_tokens: int = 20, adapter: str | None = None, image_mask: Any = None,
                 stats: dict[str, int] | None = None) -> list[str]:
        """Greedy decoding (left-padded batch, KV cache) from a prompt holding the soft image tokens
        (default ``config.caption_prompt``). Returns the decoded answers, special tokens skipped. ``stats``, when
        given, has ``prompt_tokens`` (soft tokens included) and ``generated_tokens`` (up to each row's eos) added."""
        if image_features is not None:
            n = image_features.shape[0] if isinstance(image_features, torch.Tensor) else len(image_features)
        else:
            n = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        if prompt is None:
            prompt = self.config.caption_prompt.format(image=IMAGE_TOKEN)
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if image_features is None:
            image_features = [None] * n
        b = self.encode(prompts, image_features, image_mask, padding_side="left")
        eos = {self.tokenizer.eos_token_id}
        gc_eos = getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None)
        eos |= set(gc_eos if isinstance(gc_eos, list | tuple) else [gc_eos])
        eos.discard(None)
        eos_t = torch.tensor(sorted(eos), device=self.device)
        attn, pos = b["attention_mask"], b["position_ids"]
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        out_ids: list[torch.Tensor] = []
        with self.adapter_scope(adapter):
            o = self.lm(inputs_embeds=b["inputs_embeds"], attention_mask=attn, position_ids=pos, use_cache=True)
            for _ in range(max_new_tokens):
                logits = o.logits[:, -1].float()
                logits[:, self.special_ids] = float("-inf")
                nxt = logits.argmax(-1)
                nxt = torch.where(finished, torch.full_like(nxt, self.tokenizer.pad_token_id), nxt)
                out_ids.append(nxt)
                finished |= torch.isin(nxt, eos_t)
                if bool(finished.all()):
                    break
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                pos = pos[:, -1:] + 1
                o = self.lm(inputs_embeds=self._embed_ids(nxt.unsqueeze(1)), attention_mask=attn, position_ids=pos,
                            past_key_values=o.past_key_values, use_cache=True)
        texts = []
        gen = torch.stack(out_ids, 1).tolist() if out_ids else [[] for _ in range(n)]
        n_generated = 0
        for row in gen:
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            n_generated += min(cut + 1, len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        if stats is not None:
            stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + int(b["attention_mask"].sum())
            stats["generated_tokens"] = stats.get("generated_tokens", 0) + n_generated
        return texts

    # ---------------------------------------------------------------------------------------------------- save/load
    def _connector_state(self) -> dict[str, torch.Tensor]:
        sd = {f"connector.{k}": v for k, v in self.connector.state_dict().items()}
        sd["missing_image"] = self.missing_image.data
        sd["special_embed.weight"] = self.special_embed.weight.data
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    def save_trainable(self, path: str | Path) -> Path:
        """Write the trainable parts only: ``config.json``, ``connector.safetensors`` (connector, missing-image token,
        special-token embeddings), ``lora_<adapter>.safetensors`` per adapter. No pickle."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self._connector_state(), str(path / "connector.safetensors"))
        if self.peft is not None:
            from peft import get_peft_model_state_dict

            for name in self.config.adapters:
                sd = get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=False)
                save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()},
                          str(path / f"lora_{name}.safetensors"))
        meta = {
            "format": _FORMAT,
            "kind": "distillrec.MultimodalLM",
            "config": self.config.model_dump(),
            "hidden_size": self.hidden_size,
            "special_tokens": dict(zip([self.config.img_sum_token, self.config.text_sum_token], self.special_ids)),
            "active_adapter": self.active_adapter,
            "base_model": getattr(getattr(self.lm, "config", None), "_name_or_path", None),
        }
        (path / "config.json").write_text(json.dumps(meta, indent=2))
        return path

    def load_trainable(self, path: str | Path) -> None:
        """Load what ``save_trainable`` wrote into this model (same config and base width required)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "config.json").read_text())
        if meta.get("hidden_size") != self.hidden_size:
            raise ValueError(f"checkpoint width {meta.get('hidden_size')} != LM width {self.hidden_size}")
        saved = MultimodalLMConfig(**meta["config"])
        if saved.model_dump(exclude={"base", "dtype"}) != self.config.model_dump(exclude={"base", "dtype"}):
            raise ValueError("checkpoint config differs from this model's config; build with from_pretrained()")
        sd = load_file(str(path / "connector.safetensors"), device=str(self.device))
        with torch.no_grad():
            self.missing_image.copy_(sd.pop("missing_image"))
            self.special_embed.weight.copy_(sd.pop("special_embed.weight"))
        self.connector.load_state_dict({k.removeprefix("connector."): v for k, v in sd.items()}, strict=True)
        if self.peft is not None:
            from peft import set_peft_model_state_dict

            for name in self.config.adapters:
                lsd = load_file(str(path / f"lora_{name}.safetensors"), device=str(self.device))
                res = set_peft_model_state_dict(self.peft, lsd, adapter_name=name)
                bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
                if bad:
                    raise ValueError(f"adapter {name}: unexpected keys {bad[:3]}...")
            if meta.get("active_adapter") in self.config.adapters:
                self.use_adapter(meta["active_adapter"])

    def load_connector(self, path: str | Path) -> None:
        """Load only the visual connector and the missing-image token of a ``save_trainable`` folder (e.g. a
        connector alignment run's ``connector/``) into a model that may differ in everything else (adapters, LoRA
        settings, summary tokens). The connector's own settings and the LM width must match."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path / "config.json"
        if not meta_path.is_file():
            raise ValueError(f"'{meta_path}' not found (expected a folder written by save_trainable)")
        meta = json.loads(meta_path.read_text())
        if meta.get("hidden_size") != self.hidden_size:
            raise ValueError(f"connector '{path}': width {meta.get('hidden_size')} != LM width {self.hidden_size}")
        saved = MultimodalLMConfig(**meta["config"])
        keys = ["d_image", "connector", "n_query", "qformer_layers", "qformer_dim", "qformer_heads",
                "max_image_tokens", "mlp_hidden"]
        diff = [k for k in keys if getattr(saved, k) != getattr(self.config, k)]
        if diff:
            raise ValueError(f"connector '{path}' differs from this model's in {diff}: "
                             + ", ".join(f"{k}={getattr(saved, k)!r} there, {getattr(self.config, k)!r} here"
                                         for k in diff))
        sd = load_file(str(path / "connector.safetensors"), device=str(self.device))
        with torch.no_grad():
            self.missing_image.copy_(sd.pop("missing_image"))
        sd.pop("special_embed.weight", None)
        self.connector.load_state_dict({k.removeprefix("connector."): v for k, v in sd.items()}, strict=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: Any = None, model: nn.Module | None = None,
                        **load_kwargs: Any) -> MultimodalLM:
        """Rebuild from ``save_trainable`` output; the base is loaded by name (``config.base``) unless given."""
        meta = json.loads((Path(path) / "config.json").read_text())
        cfg = MultimodalLMConfig(**meta["config"])
        if (tokenizer is None) != (model is None):
            raise ValueError("pass both tokenizer and model, or neither")
        if model is None:
            from .backbone import load_causal_lm

            tokenizer, model = load_causal_lm(cfg.base, cfg.dtype, **load_kwargs)
        mm = cls(tokenizer, model, cfg)
        mm.load_trainable(path)
        return mm
