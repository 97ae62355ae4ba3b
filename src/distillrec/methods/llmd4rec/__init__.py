"""LLMD4Rec (Wu et al., arXiv 2505.18120), ``distillrec method llmd4rec CONFIG``: an LLM recommender and a
conventional recommender (CRM: SASRec, or any registered model such as GRU4Rec) teach each other in alternating
rounds. No code, equations or hyperparameters of the paper are public; this is the design of ``DESIGN.md`` and
``docs/llmd4rec.md``.

Stages (each resumable; ``--stage`` runs up to the one named):

1. ``crm_warmup``: the plain CRM, an ordinary ``distillrec train`` run folder (``<out>/crm/plain``, or ``plain_dir``)
   with every seed of ``crm_seeds``: the baseline, and (first seed) the CRM of round 1.
2. ``rounds``: for r = 1..R: (a) the previous CRM scores the distillation rows (each training user's last training
   item = the target, the items before it = the history): candidates = the target + its top-M other items, its
   logits over them, its top-k (information augmentation: the top-k items as text in the LLM's prompt);
   (b) the LLM step: LoRA on the LM, ``CE over the candidates + lambda_llm * sum_s w'_s T^2 KL(p_CRM^T || p_LLM^T)``
   (``direction: llm_to_crm`` drops the KL term: the one-directional ablation), continuing from the previous round's
   adapter, in the shared stage loop; (c) the LLM's logits over the same candidates for every row, cached in a
   teacher-logits file; (d) the CRM step: an ordinary run of the same CRM with ``train.teacher`` naming that file,
   i.e. ``CE + lambda_crm * sum_s w_s T^2 KL(p_LLM^T || p_CRM^T)`` with no LLM forward pass
   (:mod:`distillrec.training.teacher`). The last round's CRM, every seed of ``crm_seeds``, is the distilled CRM
   (``<out>/crm/distilled``); earlier rounds train the first seed only (``<out>/crm/round<r>``).
   Weights ``w_s`` (``w'_s``): the teacher's softmax probability of the target, normalised to sum 1 over the batch.
3. ``evaluate``: the distilled CRM against the plain one on every test user (full ranking, mean ± 95% CI over
   seeds, paired t / Wilcoxon tests per user, the cold-target slice, parameter count and ranking time); the LLM
   recommender alone on ``eval_users`` rows drawn by seed: full ranking over the catalogue with its own item
   embeddings, and re-ranking the distilled CRM's top-M (a target outside keeps the CRM's rank).

Outputs in ``out``: ``config.json``, ``crm/{plain,round<r>,distilled}`` (run folders), ``llm/items.safetensors``
(the LLM's item embeddings), ``llm/round<r>/final`` (LoRA), ``rounds/round<r>/{crm,teacher}.safetensors`` and
``cost.json``, ``eval/llm_{valid,test}.safetensors``, ``report.json``, ``report.md``.
"""
