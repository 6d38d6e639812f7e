"""Atomic checkpoint writing: everything goes to a temporary folder that is renamed into place at the end."""

from __future__ import annotations

import os

from .checkpoint import atomic_directory


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, **kwargs) -> str:
    """``model.save_pretrained`` (safetensors only) plus the tokenizer, written atomically.

    An interrupted save leaves ``save_directory`` as it was: never a half-written checkpoint under its name.
    Returns the directory."""
    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError("hf-compress writes safetensors only (safe_serialization=False is not supported).")
    with atomic_directory(save_directory) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return str(save_directory)
