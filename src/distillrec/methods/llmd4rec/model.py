"""The LLM recommender of LLMD4Rec and its two losses.

User state: the final hidden state at ``<TEXT_SUM>`` of the user prompt (the CRM's top-k as text, then the history's
item texts, the most recent last), through the LM with the ``recommender`` LoRA adapter (the only trainable part).
Item embeddings: the same state of each item's own prompt -- the item as a one-item history, with the same
instruction -- through the frozen LM (adapter ``base``), computed once per run. Both are centred by the mean item state (a small LM's states share a large common direction) and
L2-normalised. Score of item ``i`` for user ``u``: ``llm_scale * <u, e_i>`` (a fixed scale, no parameter). The
user prompt ends with the most recent item, written as in the item prompts, so before any training the user state
is close to that item's embedding (equal for a one-item history without suggestions): the LLM starts as a "more
like the last item" recommender, and LoRA learns from there.

LLM step loss of a row with candidates ``C`` (the target first, then the CRM's top-M) and ``R`` uniformly drawn
items ``N`` (``llm_negatives``; its own loss only, so that the LLM also learns to rank the whole catalogue and not
only among the CRM's near-misses): ``CE(scores over C + N, target) + lambda_llm * sum_s w'_s * T^2 *
KL(softmax(z_CRM / T) || softmax(z_LLM / T))``, the KL term over ``C`` only, with weights ``w'`` (the CRM's
confidence on the target, normalised over the batch; :func:`distillrec.training.teacher.kd_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...llm.multimodal import MultimodalLM
from ...training.teacher import kd_loss, kd_weights


class LLMRecommender:
    def __init__(self, mm: MultimodalLM, adapter: str, scale: float, user_instruction: str, item_instruction: str):
        self.mm, self.adapter, self.scale = mm, adapter, scale
        self.user_instruction, self.item_instruction = user_instruction, item_instruction
        self.forward_passes = 0  # prompts through the LM (users and items)
        self.item_mean: torch.Tensor | None = None  # the mean item state, subtracted from user states too

    @torch.no_grad()
    def item_states(self, texts: Sequence[str], batch_size: int, progress: bool = False) -> torch.Tensor:
        """``[n_items, d]``: the raw state of item ``i`` (``texts[i]``, ``texts[0]`` = padding, not embedded) at row
        ``i - 1``; make the table with :meth:`set_items`."""
        from tqdm.auto import tqdm

        was = self.mm.training
        self.mm.eval()
        rows = []
        for s in tqdm(range(1, len(texts), batch_size), desc="item states", unit="batch", disable=not progress,
                      dynamic_ncols=True):
            batch = list(texts[s:s + batch_size])
            rows.append(self.mm.embed(batch, adapter="base", instruction=self.item_instruction)["text"].cpu())
            self.forward_passes += len(batch)
        self.mm.train(was)
        return torch.cat(rows)

    def set_items(self, states: torch.Tensor) -> torch.Tensor:
        """Keep the mean of the raw item states ``[n_items, d]`` (subtracted from every user state) and return the
        item table ``[n_items + 1, d]`` (:func:`centred_table`)."""
        self.item_mean = states.float().mean(0)
        return centred_table(states)

    def user_states(self, texts: Sequence[str]) -> torch.Tensor:
        """``[B, d]`` user states, centred like the items (the mean item state subtracted) and normalised;
        gradients through LoRA when enabled."""
        self.forward_passes += len(texts)
        h = self.mm.embed(list(texts), adapter=self.adapter, instruction=self.user_instruction)["text"].float()
        if self.item_mean is not None:
            h = h - self.item_mean.to(h.device)
        return F.normalize(h, dim=-1)

    def candidate_scores(self, states: torch.Tensor, table: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return candidate_scores(states, table, candidates, self.scale)

    def full_scores(self, states: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``[B, n_items + 1]`` (column 0 = padding, ``-inf``)."""
        s = self.scale * states @ table.to(states.device).T
        s[:, 0] = -torch.inf
        return s


def centred_table(states: torch.Tensor) -> torch.Tensor:
    """Item states ``[n, d]`` -> ``[n + 1, d]``: the mean state subtracted, rows L2-normalised, a zero padding row."""
    x = states.float()
    x = F.normalize(x - x.mean(0, keepdim=True), dim=-1)
    return torch.cat([torch.zeros(1, x.shape[1]), x])


def candidate_scores(states: torch.Tensor, table: torch.Tensor, candidates: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``[B, C]``: ``scale * <state_b, table[candidates[b, c]]>``."""
    emb = table.to(states.device)[candidates.to(states.device)]  # [B, C, d]
    return scale * torch.einsum("bd,bcd->bc", states, emb)


def llm_step_loss(scores: torch.Tensor, crm_logits: torch.Tensor | None, *, lam: float, temperature: float,
                  weighting: str) -> tuple[torch.Tensor, dict[str, float]]:
    """The LLM step's loss on a batch: cross-entropy with the target in column 0 over all of ``scores`` [B, C + R],
    plus (``crm_logits`` [B, C] given and ``lam > 0``) ``lam * sum_s w'_s T^2 KL(p_CRM^T || p_LLM^T)`` over the
    first C columns (the candidates both models score)."""
    ce = F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))
    parts = {"llm_ce": float(ce.detach())}
    loss = ce
    if crm_logits is not None and lam > 0:
        crm = crm_logits.to(scores.device)
        kd = kd_loss(scores[:, : crm.shape[1]], crm, temperature, kd_weights(crm, weighting))
        loss = ce + lam * kd
        parts["llm_kd"] = float(kd.detach())
    return loss, parts
