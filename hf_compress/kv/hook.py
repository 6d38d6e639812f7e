"""How a KV method travels with the model.

* ``make_cache(model, spec)``: a fresh cache for one ``generate`` call (or a manual forward loop).
* Default cache in ``generate``: transformers has no registry for third-party ``cache_implementation`` strings, so
  `install_default_cache` gives the model *instance* its own ``_prepare_cache_for_generation`` (the GenerationMixin
  step that creates ``DynamicCache`` when none is passed; a private method, guarded by tests/test_compat.py). The
  class's own step runs first; the hf-compress cache replaces its result only where transformers built a default
  ``DynamicCache``: no cache passed (under any keyword), ``use_cache`` not false and no ``cache_implementation``
  asked for, so an explicit cache (or ``cache_implementation``) still wins. It is installed by the quantizer's post-processing,
  which runs after ``from_pretrained`` of an hf-compress checkpoint and after ``hf_compress.compress`` in memory.
* Checkpoint: the spec is ``CompressionConfig.kv`` (config.json). Calibrated projections (lowrank) are buffers of a
  ``hf_compress_kv`` submodule, saved in model.safetensors; `before_weight_loading` creates that submodule from the
  recorded ranks and checks the safetensors headers first, so a missing or misshapen tensor is a CheckpointError,
  never a silently random projection.
"""

from __future__ import annotations

import logging
import types

from transformers.cache_utils import Cache, DynamicCache

from ..errors import CheckpointError, ConfigError
from .registry import kv_method, parse_kv_spec

logger = logging.getLogger(__name__)

SPEC_ATTR = "_hf_compress_kv"


def make_cache(model, spec):
    """A new compressed cache for ``model`` from a spec (dict, CLI string such as ``"quant4"`` / ``"snapkv:0.25"``)."""
    spec = parse_kv_spec(spec)
    if spec is None:
        raise ConfigError("no KV method given")
    _check_decoder(model)
    return kv_method(spec).make_cache(model, spec)


def is_encoder_only(model) -> bool:
    """Whether every attention module of ``model`` is bidirectional (BERT-style encoders): modules that declare
    ``is_causal`` (transformers' attention classes do) and none of them causal. Such a model reads its whole input
    at once and never extends a cache token by token."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)


def _check_decoder(model) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError("hf-compress KV caches support decoder-only models")
    if is_encoder_only(model):
        raise ConfigError(f"{type(model).__name__} is an encoder-only model (its attention is bidirectional, no layer "
                          "is causal): it reads its whole input at once and has no KV cache to compress; KV caches "
                          "serve decoder models that generate token by token")


def install_default_cache(model, spec) -> None:
    """Make ``model.generate()`` use the ``spec`` cache when the caller passes none (None removes it)."""
    spec = parse_kv_spec(spec)
    if spec is None:
        model.__dict__.pop(SPEC_ATTR, None)
        model.__dict__.pop("_prepare_cache_for_generation", None)
        return
    _check_decoder(model)
    kv_method(spec).check_model(model, spec)
    model.__dict__[SPEC_ATTR] = spec
    model.__dict__["_prepare_cache_for_generation"] = types.MethodType(_prepare_cache_for_generation, model)


def default_cache_spec(model):
    return model.__dict__.get(SPEC_ATTR)


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """The class's own step first; then, where it built its default ``DynamicCache`` (no cache passed, ``use_cache``
    on, no ``cache_implementation``), that cache is swapped for the hf-compress one under whatever name generate
    keeps it (``past_key_values`` up to transformers 5.23, ``cache`` since 5.24): found by type, not by name."""
    spec = self.__dict__.get(SPEC_ATTR)
    passed = any(isinstance(v, Cache) for v in model_kwargs.values())
    result = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    if spec is not None and not passed and generation_config.cache_implementation is None:
        for key, value in model_kwargs.items():
            if type(value) is DynamicCache:
                model_kwargs[key] = make_cache(self, spec)
    return result


# ----------------------------------------------------------------------------------------------- config plumbing
def kv_only(config) -> bool:
    """True when a CompressionConfig asks for a KV method and no weight compression."""
    from ..methods import get_method

    return bool(getattr(config, "kv", None)) and config.ratio is None and config.rank is None and \
        get_method(config.method).family != "quant"


def calibrate_kv(model, config, calibration=None, tokenizer=None) -> None:
    """Run the KV method's calibration (lowrank: PCA of keys/values) on the model as compressed so far; records the
    result in ``config.kv``."""
    spec = getattr(config, "kv", None)
    if not spec:
        return
    method = kv_method(spec)
    _check_decoder(model)
    method.check_model(model, spec)
    if not method.needs_calibration(spec):
        return
    if calibration is None:
        raise ConfigError(f"KV method {spec['method']!r} is calibrated: pass calibration=<text file, list of strings, "
                          "datasets.Dataset or token ids> (CLI: --calib FILE)")
    from ..calibration import calibration_windows

    cal = config.calibration
    windows = calibration_windows(calibration, tokenizer, cal["nsamples"], cal["seqlen"], cal["seed"])
    config.kv = method.calibrate(model, dict(spec), windows)


def before_weight_loading(model, config, checkpoint_files=None, pre_quantized=True) -> None:
    spec = getattr(config, "kv", None)
    if not spec:
        return
    method = kv_method(spec)
    if not pre_quantized and method.needs_calibration(spec):
        raise ConfigError(f"KV method {spec['method']!r} needs calibration text, so it cannot run inside "
                          "from_pretrained; load the model and call hf_compress.compress(model, config, calibration=...)")
    if not method.stores_tensors:
        return
    from ..safetensors_files import read_headers
    from .lowrank import ATTR, attach_projections

    try:
        proj = method.projections_for(model, spec, device="meta")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    headers = read_headers(checkpoint_files or [])
    prefix = getattr(model, "base_model_prefix", "")
    for name, shape in proj.expected_tensors().items():
        key = f"{ATTR}.{name}"
        found = next((k for k in (key, f"{prefix}.{key}") if k in headers), None)
        if found is None:
            raise CheckpointError(f"Checkpoint lacks tensor {key} (KV {spec['method']} projections recorded in its config).")
        if tuple(headers[found]["shape"]) != shape:
            raise CheckpointError(f"Tensor {found} has shape {tuple(headers[found]['shape'])}, but the config's KV ranks "
                                  f"and the model's heads imply {shape}.")
    attach_projections(model, proj)


def after_weight_loading(model, config) -> None:
    spec = getattr(config, "kv", None)
    if not spec:
        return
    method = kv_method(spec)
    if method.stores_tensors:
        from .lowrank import ATTR

        proj = getattr(model, ATTR, None)
        if proj is None:
            raise ConfigError(f"KV method {spec['method']!r} has no calibrated projections on this model")
        for name, buf in proj.named_buffers():
            if buf.device.type == "meta":
                raise CheckpointError(f"KV projection {ATTR}.{name} was not loaded from the checkpoint")
    install_default_cache(model, spec)
