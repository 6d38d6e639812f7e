"""Where a model came from, as far as can be known offline: the base model's Hub id, ``license`` and ``language``
(for the card's metadata), from a Hub id, a Hub-cache snapshot folder and its ``README.md``, or a GGUF file's
metadata (with the Hub origin of the GGUF files we know, `KNOWN_GGUF`)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from torch import nn

from ..loading import SMOLLM2_GGUF
from .card import CARD_FILE

logger = logging.getLogger(__name__)

#: GGUF files we know the Hub origin of (``hf_compress.loading`` loads them): file name -> base model id.
KNOWN_GGUF = {SMOLLM2_GGUF: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def provenance_of(model: nn.Module) -> dict:
    """Where ``model`` came from, as far as can be known offline: ``base_model`` (a Hub id), ``license`` and
    ``language`` from the base model's card or GGUF metadata."""
    gguf_source = getattr(model, "_hf_compress_gguf_source", None)  # set by hf_compress.loading for GGUF files
    hint = gguf_provenance(gguf_source) if gguf_source else None
    if hint:
        return dict(hint)
    src = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))
    out: dict = {}
    readme = None
    if src and os.path.isdir(src):
        m = re.search(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots[/\\]", src)
        if m:  # a Hub-cache snapshot folder
            out["base_model"] = f"{m[1]}/{m[2]}"
        readme = Path(src, CARD_FILE)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        out["base_model"] = src
        try:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(src, CARD_FILE, local_files_only=True))
        except Exception:  # not in the local cache: no network lookups here
            readme = None
    if readme is not None and readme.is_file():
        out.update(_card_metadata(readme))
    return out


def _card_metadata(readme: Path) -> dict:
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception as e:  # a README without (valid) metadata
        logger.info("No metadata read from %s: %s", readme, e)
        return {}
    out = {}
    if getattr(data, "license", None):
        out["license"] = data.license
    if getattr(data, "language", None):
        out["language"] = data.language
    return out


def gguf_provenance(path: str | os.PathLike) -> dict:
    """``license`` / ``language`` from a GGUF file's metadata and ``base_model`` for the GGUF files we know."""
    out = {}
    if Path(path).name in KNOWN_GGUF:
        out["base_model"] = KNOWN_GGUF[Path(path).name]
    try:
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        if "general.license" in fields:
            out["license"] = str(fields["general.license"].contents())
        if "general.languages" in fields:
            out["language"] = list(fields["general.languages"].contents())
    except Exception as e:
        logger.info("No GGUF metadata read from %s: %s", path, e)
    return out
