"""TPAD end to end: ``config`` (the recipe), ``data`` (what the stages read), ``keywords`` (L_gen targets and GR),
``mutual_information`` (CLUB, MINE, InfoNCE), ``model`` (heads and losses), ``pipeline`` (the stages and the run),
``report``. See :mod:`distillrec.methods.tpad.pipeline` and docs/tpad.md."""
