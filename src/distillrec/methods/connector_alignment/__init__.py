"""Connector alignment pretraining (LLaVA stage 1), ``distillrec align CONFIG``: image features -> the item's text, with the LM frozen.

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

