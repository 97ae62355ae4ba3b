"""TPAD's trainable heads and losses on top of a :class:`~distillrec.llm.multimodal.MultimodalLM`.

Notation (DESIGN.md, "TPAD as this project defines it"): for an item, the Knowledge tower gives ``h = [h_img; h_txt]``
(the final hidden states at ``<IMG_SUM>`` and ``<TEXT_SUM>``), the Transfer tower ``t = [t_img; t_txt]``.

* :class:`ViewContrast` -- L^v and L^t of stage 1: InfoNCE between a summary state and another view of the same item
  (the frozen encoder's feature of that modality), in-batch items as negatives.
* :func:`meta_pairs` and :class:`TransitionContrast` -- stage 2a: multi-order meta pairs (item at t, item at t + k,
  k = 1..K) from the training sequences, and InfoNCE between the Transfer tower's states of the two items of a pair.
* :class:`TransitionalPatternAlignment` -- stage 2b: projectors D_H, D_L (of h) and D_T (of t), a CLUB upper bound
  between D_H(h) and D_T(t) (minimised: the knowledge part carries no transition information) and a MINE lower bound
  between D_L(h) and D_T(t) (maximised: the distilled part does). The estimators' own networks learn on detached
  projector outputs (``estimator_loss``); the encoder side gets ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .mutual_information import CLUB, MINE, CLUBSample, info_nce


def _head(d_in: int, d_out: int) -> nn.Sequential:
    # Column standardisation (batch statistics) first: LM hidden states carry a few huge, nearly constant coordinates
    # ("massive activations"), and the part that differs between items is a tiny fraction of the norm (measured on
    # the demo: the <IMG_SUM> states of different items have cosine 0.99998). A LayerNorm over the row keeps the huge
    # coordinates dominant; per-column standardisation makes the item-specific variation visible.
    return nn.Sequential(nn.BatchNorm1d(d_in, affine=False), nn.Linear(d_in, d_out))


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float,
                     same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE loss (cross-entropy) between rows of ``a`` and ``b`` [N, d] (cosine / temperature); row i of
    ``a`` and of ``b`` are a positive pair, other rows negatives. ``same`` [N, N] bool marks off-diagonal pairs that
    are positives too (the same item twice in a batch) and are left out of the negatives."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature
    if same is not None:
        off = same & ~torch.eye(len(a), dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(off, float("-inf"))
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class ViewContrast(nn.Module):
    """L^m for one modality m: InfoNCE between the item's summary state (``d_state``) and its frozen view feature
    (``d_view``), each through a small head into ``d_out``; rows with ``valid=False`` (no image, no text) are left
    out, and fewer than two valid rows give 0."""

    def __init__(self, d_state: int, d_view: int, d_out: int = 128, temperature: float = 0.1):
        super().__init__()
        self.state_head = _head(d_state, d_out)
        self.view_head = _head(d_view, d_out)
        self.temperature = temperature

    def forward(self, state: torch.Tensor, view: torch.Tensor, valid: torch.Tensor | None = None,
                items: torch.Tensor | None = None) -> torch.Tensor:
        if valid is not None:
            valid = valid.to(state.device)
            state, view = state[valid], view.to(state.device)[valid]
            items = None if items is None else items.to(state.device)[valid]
        if len(state) < 2:
            return state.sum() * 0.0
        same = None if items is None else items.unsqueeze(0) == items.unsqueeze(1)
        return contrastive_loss(self.state_head(state), self.view_head(view.to(state.dtype)), self.temperature, same)


def meta_pairs(sequences: Sequence[np.ndarray], max_order: int, *, max_len: int | None = None,
               context_items: int = 0) -> tuple[np.ndarray, list[list[int]] | None]:
    """Every multi-order meta pair ``(anchor, positive, k)`` of the training sequences: the item at position t and
    the item at t + k for k = 1..``max_order`` (pairs of an item with itself are skipped). ``max_len``: only the last
    ``max_len`` items of each sequence. Returns int64 [P, 3] and, with ``context_items``, each anchor's up to
    ``context_items`` preceding items of its sequence (its session context), else None."""
    pairs: list[tuple[int, int, int]] = []
    contexts: list[list[int]] = []
    for seq in sequences:
        s = np.asarray(seq, dtype=np.int64)
        if max_len is not None:
            s = s[-max_len:]
        for k in range(1, max_order + 1):
            for j in range(len(s) - k):
                if s[j] != s[j + k]:
                    pairs.append((int(s[j]), int(s[j + k]), k))
                    if context_items:
                        contexts.append([int(x) for x in s[max(0, j - context_items):j]])
    return np.array(pairs, dtype=np.int64).reshape(-1, 3), (contexts if context_items else None)


class TransitionContrast(nn.Module):
    """Stage 2a: a shared head maps the Transfer tower's ``[t_img; t_txt]`` of both items of a meta pair into
    ``d_out``; InfoNCE over the batch, with other pairs whose positive is the same item removed from the negatives."""

    def __init__(self, d_state: int, d_out: int = 128, temperature: float = 0.1):
        super().__init__()
        self.head = _head(d_state, d_out)
        self.temperature = temperature

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, positive_items: torch.Tensor) -> torch.Tensor:
        positive_items = positive_items.to(anchor.device)
        same = positive_items.unsqueeze(0) == positive_items.unsqueeze(1)
        return contrastive_loss(self.head(anchor), self.head(positive), self.temperature, same)

    @torch.no_grad()
    def retrieval(self, anchor: torch.Tensor, positive: torch.Tensor, positive_items: torch.Tensor
                  ) -> dict[str, float]:
        """Held-out retrieval through the head: each anchor ranks all positives of the set (cosine); top-1, HR@10,
        MRR and the mean rank of its own (other rows with the same positive item are not counted against it), with
        chance top-1 = 1 / N. The head's standardisation uses the set's own statistics, as in training, and leaves
        its running statistics alone."""
        norm, lin = self.head[0], self.head[1]

        def head(x: torch.Tensor) -> torch.Tensor:
            return lin(F.batch_norm(x.float(), None, None, training=True, eps=norm.eps))

        a, p = F.normalize(head(anchor), dim=-1), F.normalize(head(positive), dim=-1)
        sims = a @ p.t()
        positive_items = positive_items.to(a.device)
        same = (positive_items.unsqueeze(0) == positive_items.unsqueeze(1)) & ~torch.eye(len(a), dtype=torch.bool,
                                                                                         device=a.device)
        sims = sims.masked_fill(same, float("-inf"))
        rank = (sims >= sims.diagonal().unsqueeze(1)).sum(1).float()
        return {"top1": float((rank == 1).float().mean()), "hr@10": float((rank <= 10).float().mean()),
                "mrr": float((1 / rank).mean()), "mean_rank": float(rank.mean()), "n": len(a),
                "chance_top1": 1 / len(a)}


def similarity_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Neighbourhood distillation from ``teacher`` [N, d_t] into ``student`` [N, d_s], with no trainable map between
    them: each row's softmax over its cosines to the other rows of the batch (columns standardised over the batch, the
    row itself left out) in the student is pulled to the teacher's, KL(p_teacher || p_student). The term acts on the
    student itself, so what it learns is in the student's own geometry (the exported embedding), not in a projector
    that could absorb it; zero when every row is the same item."""
    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-6)
        return F.normalize(x, dim=-1)

    n = len(student)
    if n < 3:
        return student.sum() * 0.0
    eye = torch.eye(n, dtype=torch.bool, device=student.device)
    s, t = unit(student), unit(teacher.to(student.device)).detach()
    log_p_s = F.log_softmax((s @ s.t() / temperature).masked_fill(eye, float("-inf")), dim=-1)
    p_t = F.softmax((t @ t.t() / temperature).masked_fill(eye, float("-inf")), dim=-1)
    return (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_p_s.masked_fill(eye, 0.0))).sum(-1).mean()


def _projector(d_in: int, d_out: int) -> nn.Sequential:
    # standardised input as in _head; normalised output, so no loss can be lowered by shrinking a projection
    return nn.Sequential(nn.BatchNorm1d(d_in, affine=False), nn.Linear(d_in, d_out), nn.GELU(),
                         nn.Linear(d_out, d_out), nn.LayerNorm(d_out, elementwise_affine=False))


class TransitionalPatternAlignment(nn.Module):
    """D_H, D_L, D_T and the two estimators (see the module docstring). ``club``: ``"full"`` (vCLUB over all
    pairs of the batch) or ``"sampled"`` (one permutation). ``mine_ma_rate``: MINE's moving-average gradient
    correction for the estimator's own updates (None: the plain Donsker-Varadhan gradient)."""

    def __init__(self, d_knowledge: int, d_transfer: int, d_proj: int = 64, estimator_hidden: int = 64,
                 club: Literal["full", "sampled"] = "sampled", mine_ma_rate: float | None = 0.01,
                 lower_bound: Literal["mine", "cosine_infonce"] = "mine", temperature: float = 0.1):
        super().__init__()
        # "mine": the seed's MINE bound, which any invertible code of the item maximises, so it need not carry the
        # Transfer states' geometry (which items lie near which); "cosine_infonce": InfoNCE on cosine similarities of
        # D_L(h) and D_T(t), which aligns directions, so D_T(t)'s neighbourhoods carry over to D_L(h)
        self.lower_bound, self.temperature = lower_bound, temperature
        self.D_H = _projector(d_knowledge, d_proj)
        self.D_L = _projector(d_knowledge, d_proj)
        self.D_T = _projector(d_transfer, d_proj)
        self.club = (CLUBSample if club == "sampled" else CLUB)(d_proj, d_proj, estimator_hidden)
        self.mine = MINE(d_proj, d_proj, estimator_hidden, ma_rate=mine_ma_rate)

    def projector_parameters(self) -> list[nn.Parameter]:
        return [*self.D_H.parameters(), *self.D_L.parameters(), *self.D_T.parameters()]

    def estimator_parameters(self) -> list[nn.Parameter]:
        return [*self.club.parameters(), *self.mine.parameters()]

    def project(self, h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.D_H(h), self.D_L(h), self.D_T(t)

    def estimator_loss(self, hh: torch.Tensor, hl: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        """What CLUB's q network and MINE's statistics network minimise, on detached projector outputs."""
        hh, hl, tt = hh.detach(), hl.detach(), tt.detach()
        loss = self.club.learning_loss(hh, tt)
        return loss + self.mine.learning_loss(hl, tt) if self.lower_bound == "mine" else loss

    def forward(self, hh: torch.Tensor, hl: torch.Tensor, tt: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"club": upper bound I(D_H(h); D_T(t)), "mine": lower bound I(D_L(h); D_T(t))}`` with gradients to the
        projector outputs (and through them to the Knowledge tower)."""
        if self.lower_bound == "mine":
            lower = self.mine(hl, tt)
        else:
            lower = info_nce(F.normalize(hl, dim=-1), F.normalize(tt, dim=-1), temperature=self.temperature)
        return {"club": self.club(hh, tt), "mine": lower}


class KnowledgeHeads(nn.Module):
    """The L^v / L^t heads of the Knowledge tower (each None when its modality or view is absent, or ``views`` is
    False): ``d`` is the LM width, ``d_image``/``d_text_view`` the widths of the frozen views (None: absent)."""

    def __init__(self, d: int, d_image: int | None, d_text_view: int | None, d_contrast: int, temperature: float,
                 views: bool = True):
        super().__init__()
        self.view_v = ViewContrast(d, d_image, d_contrast, temperature) if views and d_image is not None else None
        self.view_t = ViewContrast(d, d_text_view, d_contrast, temperature) \
            if views and d_text_view is not None else None
