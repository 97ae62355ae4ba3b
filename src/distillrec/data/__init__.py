"""Data layer: the canonical Dataset, the loaders that produce it, the embedded demo shop, batching."""

from . import loaders, synthetic  # noqa: F401  (registers every loader format and known dataset)
from .dataset import DataError, Dataset, Examples, ItemTable, leave_one_out

__all__ = ["DataError", "Dataset", "Examples", "ItemTable", "leave_one_out"]
