"""Yes/no candidate scoring with a causal (multimodal) LM, with an optional key/value cache of the shared prefix.

An LLM-centric recommender (MLLM-MSR; the LLM-centric baseline of TPAD's speed comparison) asks one question per
candidate: "... Candidate item: <item prompt>. Will the user ...? Answer yes or no." and reads the logits of "yes"
and "no" at the last prompt position. :func:`score_yes_no` returns ``logit(yes) - logit(no)`` per prompt;
``p(yes) / (p(yes) + p(no)) = sigmoid(logit(yes) - logit(no))`` (:func:`p_yes`), the same ranking.

``kv_cache=True``: the token prefix that all prompts share (chat header, instruction, the user's history) runs
through the LM once and its key/value cache serves every batch, which then runs only its candidates' own tokens: the
same scores up to float rounding (tested), with far fewer tokens when the prefix is long.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .multimodal import MultimodalLM


def yes_no_ids(tokenizer: Any) -> tuple[int, int]:
    """First token of "yes" and of "no" (the answer starts right after the prompt's newline / assistant turn)."""
    yes = tokenizer("yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("no", add_special_tokens=False)["input_ids"]
    if not yes or not no or yes[0] == no[0]:
        raise ValueError(f"cannot tell 'yes' from 'no' with this tokenizer (ids {yes} / {no})")
    return yes[0], no[0]


def shared_prefix_length(ids: torch.Tensor, attn: torch.Tensor, ref: torch.Tensor) -> int:
    """Length of the token prefix that every row of a right-padded batch shares with ``ref`` (soft image slots,
    id < 0, never count: their embeddings differ per item), leaving each row at least one token of its own."""
    n = min(ref.shape[0], ids.shape[1])
    same = (ids[:, :n] == ref[:n]).all(0) & attn[:, :n].bool().all(0) & (ref[:n] >= 0)
    return min(int(same.long().cumprod(0).sum()), int(attn.sum(1).min()) - 1)


def p_yes(scores: torch.Tensor) -> torch.Tensor:
    """``p(yes) / (p(yes) + p(no))`` from :func:`score_yes_no`'s logit differences."""
    return torch.sigmoid(scores)


@torch.inference_mode()
def score_yes_no(mm: MultimodalLM, prompts: Sequence[str], image_features: torch.Tensor | None = None,
                 image_mask: torch.Tensor | None = None, *, adapter: str | None = None, batch_size: int = 32,
                 kv_cache: bool = False, stats: dict[str, Any] | None = None) -> torch.Tensor:
    """``logit(yes) - logit(no)`` at the last position of each user-turn ``prompt`` (float32, ``[len(prompts)]``).

    ``image_features``/``image_mask``: one row per prompt (the prompt's ``<image>`` slot), or None. Prompts run in
    batches of ``batch_size`` in the given order (left padding without the cache, right padding with it; the LM head
    runs on the last position only). ``stats``, when given, receives ``tokens`` (prompt tokens run through the LM),
    ``candidates`` and ``prefix_tokens`` (0 without the cache)."""
    yes, no = yes_no_ids(mm.tokenizer)
    head = mm.lm.get_output_embeddings()
    dec = mm._decoder()
    scores = torch.empty(len(prompts))
    tokens = 0
    prefix_ids, prefix_cache, P = None, None, 0
    with mm.adapter_scope(adapter):
        for s in range(0, len(prompts), batch_size):
            n = len(prompts[s:s + batch_size])
            img = None if image_features is None else image_features[s:s + n]
            mask = None if image_mask is None else image_mask[s:s + n]
            enc = mm.encode(list(prompts[s:s + n]), [None] * n if img is None else img, mask,
                            padding_side="right" if kv_cache else "left")
            emb, attn, pos = enc["inputs_embeds"], enc["attention_mask"], enc["position_ids"]
            if not kv_cache:
                h = dec(inputs_embeds=emb, attention_mask=attn, position_ids=pos,
                        use_cache=False).last_hidden_state[:, -1]
                tokens += int(attn.sum())
            else:
                ids = enc["input_ids"]
                if prefix_cache is None:
                    P = shared_prefix_length(ids, attn, ids[0])
                    prefix_ids = ids[0, :P]
                    prefix_cache = dec(inputs_embeds=emb[:1, :P], attention_mask=attn[:1, :P],
                                       position_ids=pos[:1, :P], use_cache=True).past_key_values
                    tokens += P
                else:
                    shared = shared_prefix_length(ids, attn, prefix_ids)
                    if shared < P:  # this batch shares less of the prefix than the first did: cut the cache back
                        prefix_cache.crop(shared)
                        P, prefix_ids = shared, prefix_ids[:shared]
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(n)
                out = dec(inputs_embeds=emb[:, P:], attention_mask=attn, position_ids=pos[:, P:],
                          past_key_values=cache, use_cache=True).last_hidden_state
                last = attn.sum(1) - 1 - P
                h = out[torch.arange(n), last]
                tokens += int(attn[:, P:].sum())
            logits = head(h).float()
            scores[s:s + n] = (logits[:, yes] - logits[:, no]).cpu()
    if stats is not None:
        stats.update(tokens=tokens, candidates=len(prompts), prefix_tokens=P)
    return scores
