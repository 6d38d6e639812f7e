"""`compress(model, config)`: compress a loaded transformers model in place.

The driver: coerce the config, route it (weights: `hf_compress.pipelines`, data-free or block by block; KV cache:
`hf_compress.kv`), record where the calibration came from and the model's provenance, and mark the model with
the load hook (`hf_compress.quantizer.attach`) so that ``save_pretrained`` writes an hf-compress checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os

from torch import nn

from .auto import own_config
from .config import CompressionConfig
from .coverage import coverage_report, log_coverage
from .errors import ConfigError
from .pipelines import compress_modules
from .quantizer import attach
from .recipes import resolve as resolve_recipe
from .resume import scratch_folder


def compress(model: nn.Module, config: CompressionConfig | dict | str, *, calibration=None, tokenizer=None,
             progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
             checkpoint_every: float = 60.0) -> nn.Module:
    """Compress ``model`` in place according to ``config`` and return it.

    ``calibration`` (calibrated methods): a text file path, a list of strings, a ``datasets.Dataset`` (``text``
    column) or a tensor of token ids; ``tokenizer`` tokenizes text sources. Vision-language models also take
    image+text samples, a list of ``{"text": "<image> ...", "images": [PIL images]}`` (the text holding the family's
    own image placeholder) with ``tokenizer`` the model's processor (``AutoProcessor``), or of ready model-input
    dicts (``input_ids``, ``pixel_values``, ...): each sample is one window, the first ``calibration["nsamples"]``
    are used (`hf_compress.calibration.multimodal_inputs`); the language model's blocks are then fitted on what the
    vision tower and projector feed them. The model keeps its class (``LlamaForCausalLM`` stays
    ``LlamaForCausalLM``); targeted layers become compressed modules, and the model is marked so that
    ``save_pretrained`` writes an hf-compress checkpoint.

    Afterwards the share of the model compressed, by kind of weight (`hf_compress.coverage.coverage_report`:
    attention, dense MLP, experts, shared experts, router, embeddings/head, other), is logged at INFO, and a warning
    names every large weight of the repeated blocks that stays dense because no method can compress it (one that
    ``config.skip`` names excepted).

    ``checkpoint_dir``: make the run resumable (`hf_compress.resume`): finished blocks are checkpointed there as
    safetensors (the sequential engine's streams at most every ``checkpoint_every`` seconds); when the folder
    already holds a run with the same settings, compression continues after its last committed block and the
    result equals an uninterrupted run bit for bit. Delete the folder once the model is saved. The compressed
    layers of blocks that accelerate offloaded (``device_map`` with ``"disk"``/``"cpu"`` offload) are read from
    their files there, memory-mapped, once their block is written, so that finished blocks do not accumulate in RAM
    (on Linux a mapped file may be deleted: the mapping keeps its bytes). Without ``checkpoint_dir`` an offloaded
    model gets the same release through a scratch folder in accelerate's offload folder (else the temp dir),
    deleted when the call returns (`hf_compress.resume.scratch_folder`); its files' disk space is freed with the
    model.
    """
    config = resolve_recipe(model, CompressionConfig.coerce(config))  # a recipe's parts the model cannot take: left out
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ConfigError("This model is already compressed/quantized; load the dense model to compress it again.")
    own_config(model)  # the caller's config object (``from_config(c)``) stays as it was
    from .kv.hook import calibrate_kv, kv_only  # the KV cache methods load only when a config is compressed

    if not kv_only(config):
        if checkpoint_dir is None:  # an offloaded model still gets its finished blocks out of RAM
            folder = scratch_folder(model)
            checkpoint_every = math.inf  # no stream commits: nothing will resume from it
        else:
            folder = contextlib.nullcontext(checkpoint_dir)
        with folder as checkpoint_dir:
            compress_modules(model, config, calibration=calibration, tokenizer=tokenizer, progress=progress,
                             checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
        # no silent skips: the coverage by kind at INFO, a warning naming block weights no method could take
        log_coverage(coverage_report(model, skip=config.skip,
                                     pruned=(config.pruned_experts or {}).get("parameters", 0)))
    calibrate_kv(model, config, calibration=calibration, tokenizer=tokenizer)  # KV method (hf_compress/kv)
    if calibration is not None and not config.calibration.get("source"):
        config.calibration["source"] = _describe_source(calibration)
    if not config.provenance:  # for the model card: base model id, license, language when known
        from .hub import provenance_of

        config.provenance = provenance_of(model)
    attach(model, config)
    return model


def _describe_source(calibration) -> str:
    if isinstance(calibration, (str, os.PathLike)):
        return os.path.basename(str(calibration))
    if isinstance(calibration, (list, tuple)):
        if calibration and all(isinstance(s, dict) for s in calibration):
            return f"{len(calibration)} image+text samples"
        return f"{len(calibration)} texts"
    info = getattr(calibration, "info", None)
    if info is not None:
        return f"datasets.Dataset {getattr(info, 'dataset_name', None) or ''}".strip()
    return type(calibration).__name__
