"""Atomic checkpoint writing: everything goes to a temporary folder that is renamed into place at the end
(`hf_compress.atomic`). What a compressed model's folder carries beyond its weights (evaluation records, the model
card) is added by `hf_compress.save_pretrained` (`hf_compress.hub.save`)."""

from __future__ import annotations

import os

from .atomic import atomic_directory


def save_checkpoint(model, save_directory: str | os.PathLike, tokenizer=None, extra=None, **kwargs) -> str:
    """``model.save_pretrained`` (safetensors only) plus the tokenizer, written atomically; ``extra(folder)``, when
    given, writes more files into the (temporary) folder before it is renamed into place.

    An interrupted save leaves ``save_directory`` as it was: never a half-written checkpoint under its name.
    Returns the directory."""
    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError("hf-compress writes safetensors only (safe_serialization=False is not supported).")
    with atomic_directory(save_directory) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return str(save_directory)
