"""Recommenders, one file each, all behind :class:`~distillrec.models.base.Recommender` and found by name."""

from . import pop  # noqa: F401  (each import registers its models)
from . import gru4rec, sasrec, fused  # noqa: F401
from . import sknn, srgnn  # noqa: F401
from . import dimo  # noqa: F401
from .base import Recommender, available_models, build_model, get_model_class, register_model

__all__ = ["Recommender", "available_models", "build_model", "get_model_class", "register_model"]
