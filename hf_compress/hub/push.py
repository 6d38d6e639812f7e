"""Pushing to the Hub: `push_to_hub` (and ``hf-compress push``) saves a model (or takes a checkpoint folder),
regenerates its card, and uploads the folder in one commit with `HfApi.upload_folder`. Compressed models get it as
``model.push_to_hub`` (`bind`, when they are compressed or loaded), so transformers' own README stub never replaces
the card."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

from ..version import __version__
from ..errors import CheckpointError
from .card import write_model_card
from .records import EVAL_FILE
from .save import save_pretrained


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "hf_compress"
    except json.JSONDecodeError:
        return False


def push_to_hub(model_or_dir, repo_id: str, *, tokenizer=None, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, create_pr: bool = False, max_shard_size: int | str = "50GB",
                tags: list[str] | None = None, base_model: str | None = None, license: str | None = None):
    """Upload a compressed model (in memory, or a checkpoint folder written by hf-compress) to the Hub in one
    commit: safetensors weights, config with the ``hf_compress_autoload.py`` shim, tokenizer (when given or in the
    folder), generation config, evaluation records and a freshly generated model card with its plot.

    A folder gets its card regenerated in place first. Remote ``*.safetensors`` files not in this upload (stale
    shards of an earlier push) are deleted by the same commit. Returns the ``CommitInfo``."""
    from huggingface_hub import HfApi

    api = HfApi(library_name="hf-compress", library_version=__version__)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_dir, (str, os.PathLike)):
            folder = Path(model_or_dir)
            if not is_checkpoint_dir(folder):
                raise CheckpointError(f"{folder} is not an hf-compress checkpoint folder (no config.json with "
                                      "model_type 'hf_compress').")
            from ..loading import load_model

            model, _ = load_model(folder, dtype="auto")
        else:
            model = model_or_dir
            folder = Path(tmp) / "checkpoint"
            save_pretrained(model, folder, tokenizer=tokenizer, max_shard_size=max_shard_size, model_card=False)
        write_model_card(model, folder, repo_id=repo_id, base_model=base_model, license=license, tags=tags)
        repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo, folder_path=str(folder), commit_message=commit_message or "Upload hf-compress checkpoint",
            commit_description=commit_description, token=token, revision=revision, create_pr=create_pr,
            ignore_patterns=[".tmp-*", ".old-*", ".README.*", f".{EVAL_FILE}.*"],
            delete_patterns=["*.safetensors", "*.safetensors.index.json"])


class _PushToHub:
    """``model.push_to_hub`` of a compressed model: `push_to_hub` with the model bound. An object rather than a bound
    method so that it survives ``copy.deepcopy`` and pickling (``torch.save(model)``) still bound to its model."""

    __doc__ = push_to_hub.__doc__

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, repo_id: str, **kwargs):
        return push_to_hub(self.model, repo_id, **kwargs)


def bind(model: nn.Module) -> None:
    """Give a compressed model our ``push_to_hub`` (transformers' would replace the card with its README stub)."""
    model.push_to_hub = _PushToHub(model)


def unbind(model: nn.Module) -> None:
    model.__dict__.pop("push_to_hub", None)
