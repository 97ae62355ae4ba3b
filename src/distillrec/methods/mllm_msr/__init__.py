"""MLLM-MSR (Ye et al., AAAI 2025), ``distillrec method mllm_msr CONFIG``: a multimodal LLM as a sequential recommender.

Stages (each resumable; ``--stage`` runs up to the one named):

1. ``item_summaries``: the frozen LM reads an item's image through the visual connector aligned on image -> item text
   (``connector:``, the folder ``distillrec align`` writes) and writes a one-sentence description
   (``image_summary_prompt``, greedy, ``image_summary_tokens``). Only items that appear in a summarised history.
2. ``preferences``: each user's last ``history_len`` items before the target, in blocks of ``block_size`` (default 3);
   the first block's prompt asks for a preference summary, each later prompt carries the previous summary and asks for
   an updated one (``recurrent``); ``direct`` (the MLLM-MSR_R ablation) puts the whole history in one prompt;
   ``image_summary: false`` (MLLM-MSR_I) lists titles only. Greedy decoding (the official code samples at
   temperature 0.6; greedy makes the summaries, and so every number, reproducible).
   Both stages cache every text on disk by (model, prompt, length), append batch by batch, and split the missing
   prompts across ranks under ``torchrun`` (:mod:`.summaries`).
3. ``recommender``: LoRA SFT (one adapter, ``recommender``; connector and LM frozen) on
   ``preference summary + candidate title + candidate image tokens -> "yes"/"no"``, 1 positive : ``train_negatives``
   never-interacted items per training user (their last training item is the positive), cross-entropy on the answer
   token only (the official code puts the loss on the whole prompt; we do not). The shared stage loop: seeded,
   resumable after a kill.
4. ``evaluate``: score = p(yes) / (p(yes) + p(no)) from one forward pass (:func:`~distillrec.llm.scoring.score_yes_no`,
   one user's candidates per batch with the shared prefix's key/value cache) on the sampled protocol of
   :mod:`distillrec.evaluation.candidates`: ``eval_users`` users drawn by seed, their valid and test targets each with
   ``n_negatives`` (20) never-interacted items, saved in the run; AUC, HR@1/5/10, MRR@5, NDCG@5, the cold-target
   slice; the LM before SFT on the same candidates (``zero_shot``); every run in ``baselines`` (any ``distillrec train``
   folder on the same data: SASRec, GRU4Rec, DIMO, DIMO on TPAD embeddings) scored on the very same candidates, with
   paired tests; with ``rerank: RUN``, MLLM-MSR re-ranks that run's top-``rerank_top_n`` inside full ranking.

Users: the training users are ``train_users`` users drawn by seed (those with at least 2 training items); the ranked
users are ``eval_users`` drawn by seed, the same in valid and test. Nothing of a ranked user's valid/test target is
in its prompts (histories end before the target; leave-one-out keeps the order).

Outputs in ``out``: ``config.json``, ``candidates/{valid,test}.safetensors``, ``summaries/*.jsonl`` (+ their cost),
``recommender/final`` (LoRA), ``scores/*.safetensors``, ``report.json``, ``report.md`` (tables + cost per stage).
"""
