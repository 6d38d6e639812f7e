"""Publishing a compressed model: measured evaluation records, the generated model card and its plot, and
``push_to_hub`` through ``huggingface_hub``. One concern per module:

* `records` — **evaluation records** (``hf_compress_eval.json`` beside the checkpoint), each carrying a fingerprint
  of the weights it was measured on (`weights_fingerprint`). The card shows a number only when its fingerprint
  matches the weights being published, so a model fine-tuned or re-compressed after an evaluation never inherits
  that evaluation's numbers.
* `provenance` — where a model came from (base model id, license, language; GGUF files included).
* `card` — **the card**, rendered from ``hf_compress/model_cards/hf_compress_card.md`` (installed as
  ``hf_compress.model_cards``) with `huggingface_hub.ModelCard` / `ModelCardData`; its tables come from the model
  itself (`hf_compress.summary`: `layer_table`, `size_breakdown`), never from the config's intentions.
* `plot` — the card's plot (matplotlib optional).
* `save` — `hf_compress.save_pretrained`: the checkpoint folder with its records and card, written atomically.
* `push` — `push_to_hub` saves (or takes a checkpoint folder), regenerates the card, and uploads the folder in one
  commit with `HfApi.upload_folder`. Compressed models get it as ``model.push_to_hub`` (`bind`, per instance), so
  transformers' own README stub never replaces the card.
"""

from .card import CARD_FILE, LIBRARY_NAME, PROTOCOL, TEMPLATE, layer_groups, model_card, write_model_card
from .plot import PLOT_FILE, plot_layers
from .provenance import KNOWN_GGUF, gguf_provenance, provenance_of
from .push import bind, is_checkpoint_dir, push_to_hub, unbind
from .records import (EVAL_FILE, add_evaluation, evaluation_record, load_evaluations, merge_evaluations,
                      model_evaluations, save_evaluations, weights_fingerprint)
from .save import save_pretrained
from ..summary import size_breakdown

__all__ = [
    "CARD_FILE", "EVAL_FILE", "KNOWN_GGUF", "LIBRARY_NAME", "PLOT_FILE", "PROTOCOL", "TEMPLATE",
    "add_evaluation", "bind", "evaluation_record", "gguf_provenance", "is_checkpoint_dir", "layer_groups",
    "load_evaluations", "merge_evaluations", "model_card", "model_evaluations", "plot_layers", "provenance_of",
    "push_to_hub", "save_evaluations", "save_pretrained", "size_breakdown", "unbind", "weights_fingerprint",
    "write_model_card",
]
