"""LLM methods, one folder each, end to end: config, data preparation, heads and losses, pipeline (stages in the
shared stage loop), report. ``registry.METHODS`` lists them; ``distillrec method NAME CONFIG`` runs any of them."""
