"""Atomic checkpoint writing: everything goes to a temporary folder that is renamed into place at the end."""

from __future__ import annotations

import os

from .checkpoint import atomic_directory


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, model_card: bool = True,
                    **kwargs) -> str:
    """``model.save_pretrained`` (safetensors only) plus the tokenizer, the evaluation records travelling with the
    model (``hf_compress_eval.json``) and, with ``model_card=True``, the generated model card (``README.md`` and its
    plot, `hf_compress.hub`), all written atomically.

    An interrupted save leaves ``save_directory`` as it was: never a half-written checkpoint under its name.
    Returns the directory."""
    from .hub import model_evaluations, save_evaluations, write_model_card

    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError("hf-compress writes safetensors only (safe_serialization=False is not supported).")
    compressed = hasattr(getattr(model.config, "quantization_config", None), "method")  # an hf-compress model
    with atomic_directory(save_directory) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if compressed:
            evaluations = model_evaluations(model)
            if evaluations:
                save_evaluations(tmp, evaluations)
            if model_card:
                write_model_card(model, tmp, evaluations=evaluations)
    return str(save_directory)
