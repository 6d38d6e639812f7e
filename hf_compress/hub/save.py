"""`hf_compress.save_pretrained`: a compressed model's checkpoint folder as it is published, written atomically (the
weights and tokenizer by `hf_compress.saving`, plus the evaluation records and the model card with its plot)."""

from __future__ import annotations

import os

from ..saving import save_checkpoint
from .card import write_model_card
from .records import model_evaluations, save_evaluations


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, model_card: bool = True,
                    **kwargs) -> str:
    """``model.save_pretrained`` (safetensors only) plus the tokenizer, the evaluation records travelling with the
    model (``hf_compress_eval.json``) and, with ``model_card=True``, the generated model card (``README.md`` and its
    plot, `hf_compress.hub`), all written atomically.

    An interrupted save leaves ``save_directory`` as it was: never a half-written checkpoint under its name.
    Returns the directory."""
    compressed = hasattr(getattr(model.config, "quantization_config", None), "method")  # an hf-compress model

    def records_and_card(tmp):
        evaluations = model_evaluations(model)
        if evaluations:
            save_evaluations(tmp, evaluations)
        if model_card:
            write_model_card(model, tmp, evaluations=evaluations)

    return save_checkpoint(model, save_directory, tokenizer=tokenizer, extra=records_and_card if compressed else None,
                           **kwargs)
