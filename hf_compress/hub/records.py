"""Evaluation records bound to the weights they measured: ``hf_compress_eval.json`` beside a checkpoint.

Each record carries a fingerprint of the weights it was measured on (`weights_fingerprint`); the card shows a number
only when that fingerprint matches the weights being published, so a model fine-tuned or re-compressed after an
evaluation never inherits that evaluation's numbers. In memory the records travel with the model on its quantizer
(`model_evaluations`): read from the file when it is loaded, appended to by `add_evaluation`, saved beside it by
`hf_compress.save_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from datetime import date
from pathlib import Path

import torch
from torch import nn

from ..version import __version__
from ..atomic import atomic_file
from ..errors import CheckpointError, ConfigError

EVAL_FILE = "hf_compress_eval.json"


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every tensor in ``model.state_dict()`` (name, shape, float64 sum and sum of squares).

    Invariant under exact dtype upcasts (an fp16 checkpoint loaded in fp32 keeps its fingerprint); any change of
    the weights (fine-tuning, merging, re-compression) changes it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            continue
        x = t.detach().to(torch.float64)
        h.update(f"{name}|{tuple(t.shape)}|{x.sum().item():.9e}|{x.square().sum().item():.9e}\n".encode())
    return h.hexdigest()[:16]


def evaluation_record(result, *, dataset: str, model: nn.Module | None = None, role: str = "compressed",
                      command: str | None = None, kv: dict | None = None) -> dict:
    """One evaluation as stored in ``hf_compress_eval.json``: a `PerplexityResult` (or its dict), what was scored
    (``dataset``: a file or dataset name) and on which weights (``model``'s fingerprint; ``role="base"`` for the
    uncompressed model the checkpoint was made from, which has no fingerprint to match)."""
    if role not in ("compressed", "base"):
        raise ConfigError(f"role must be 'compressed' or 'base', got {role!r}")
    r = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    record = {"role": role, "metric": "perplexity", "value": float(r["perplexity"]), "dataset": str(dataset),
              "tokens": r.get("tokens"), "windows": r.get("windows"), "seqlen": r.get("seqlen"),
              "max_tokens": r.get("max_tokens"), "kv": kv, "date": date.today().isoformat()}
    if command:
        record["command"] = command
    if role == "compressed":
        if model is None:
            raise ConfigError("A compressed-model evaluation needs the model it measured (for its fingerprint).")
        record["fingerprint"] = weights_fingerprint(model)
    return record


def _key(r: dict) -> tuple:
    return (r["role"], r["metric"], r["dataset"], r.get("seqlen"), r.get("max_tokens"), json.dumps(r.get("kv")),
            r.get("fingerprint"))


def merge_evaluations(old: list[dict], new: list[dict]) -> list[dict]:
    """Records of ``old`` and ``new``, a newer record replacing an older one of the same measurement."""
    merged = OrderedDict((_key(r), r) for r in old)
    for r in new:
        merged.pop(_key(r), None)
        merged[_key(r)] = r
    return list(merged.values())


def load_evaluations(directory: str | os.PathLike) -> list[dict]:
    path = Path(directory) / EVAL_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data["evaluations"]
        for r in records:
            _key(r)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it or re-run the evaluation.") from None
    return records


def save_evaluations(directory: str | os.PathLike, records: list[dict]) -> None:
    """Write ``hf_compress_eval.json`` atomically (a temporary file renamed into place)."""
    with atomic_file(Path(directory) / EVAL_FILE, prefix=f".{EVAL_FILE}.") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"hf_compress_version": __version__, "evaluations": records}, f, indent=2)


def model_evaluations(model: nn.Module) -> list[dict]:
    """The evaluation records travelling with an in-memory compressed model (read from ``hf_compress_eval.json``
    when it was loaded, appended to by `add_evaluation`); saved beside it by `hf_compress.save_pretrained`."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        raise ConfigError("This model is not compressed with hf-compress; there is nowhere to record evaluations.")
    return quantizer.__dict__.setdefault("evaluations", [])


def add_evaluation(model: nn.Module, result, *, dataset: str, base: bool = False, command: str | None = None,
                   kv: dict | None = None) -> dict:
    """Record ``result`` (from `hf_compress.perplexity`) on the compressed ``model`` so its card shows it.

    ``base=True``: the result was measured on the uncompressed model before compression (shown beside it)."""
    record = evaluation_record(result, dataset=dataset, model=None if base else model,
                               role="base" if base else "compressed", command=command, kv=kv)
    evals = model_evaluations(model)
    evals[:] = merge_evaluations(evals, [record])
    return record
