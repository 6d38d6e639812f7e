"""`HfCompressQuantizer`: the transformers weight-loading hook for hf-compress checkpoints.

* pre-quantized load: before weights are read, swap each recorded module for its compressed type, after
  checking the checkpoint's tensors (names, shapes, completeness) against the config — so a bad file fails
  with an error naming it, never by loading random weights;
* compress-on-load (``from_pretrained(dense, quantization_config=CompressionConfig(...))``): weights load dense,
  then data-free methods compress them.
"""

from __future__ import annotations

import os

from transformers.quantizers import HfQuantizer, register_quantizer

from .version import __version__
from .safetensors_files import read_headers
from .config import QUANT_METHOD, CompressionConfig
from .errors import CheckpointError, ConfigError, UnsupportedModuleError
from .modules import MODULE_TYPES, compressed_modules
from .targets import SUPPORTED, set_module, shape_of




def refresh_records(model, config: CompressionConfig) -> None:
    config.modules = {name: m.record() for name, m in compressed_modules(model).items()}


def attach(model, config: CompressionConfig) -> None:
    """Mark an in-memory compressed model the way ``from_pretrained`` marks a loaded one."""
    quantizer = HfCompressQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    quantizer.postprocess_model(model)
    # transformers' save_pretrained reverts the model's load-time conversion mapping (checkpoint names and fused
    # expert layouts of the original format); an hf-compress checkpoint is written in the model's own names, which
    # its load reads back unconverted (`update_weight_conversions`). `_weight_conversions` is transformers'
    # record of that mapping (tests/test_moe.py names it).
    model._weight_conversions = []


@register_quantizer(QUANT_METHOD)
class HfCompressQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: CompressionConfig

    def validate_environment(self, *args, **kwargs):
        from .pipelines import uses_calibration

        if not self.pre_quantized and uses_calibration(self.quantization_config, calibration_given=False):
            raise ConfigError(
                f"method {self.quantization_config.method!r} (as configured) needs calibration data, so it cannot "
                "run inside from_pretrained; load the dense model and call hf_compress.compress(model, config, ...)."
            )

    def update_weight_conversions(self, weight_conversions, *args, **kwargs):
        """A pre-quantized hf-compress checkpoint holds the model's own parameter names (see `attach`): no renaming or
        expert merging of the original format applies to it. Compress-on-load reads the original format. (The hook
        takes ``model`` too since transformers 5.2x; 5.19 passes the conversions alone.)"""
        if self.pre_quantized:
            return []
        return super().update_weight_conversions(weight_conversions, *args, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .kv.hook import before_weight_loading as kv_before_weight_loading

        kv_before_weight_loading(model, self.quantization_config, checkpoint_files, self.pre_quantized)
        if not self.pre_quantized:
            return
        if checkpoint_files:  # evaluation records beside the checkpoint travel with the model (hf_compress.hub)
            from .hub import load_evaluations

            self.evaluations = load_evaluations(os.path.dirname(checkpoint_files[0]))
        records = self.quantization_config.modules
        headers = read_headers(checkpoint_files or [])
        prefix = getattr(model, "base_model_prefix", "")
        _split_recorded_experts(model, records, prefix)
        for recorded, record in records.items():
            name = _resolve_module_name(model, recorded, prefix)
            if name is None:
                raise CheckpointError(f"Config records compressed module {recorded!r}, which {type(model).__name__} lacks.")
            module = model.get_submodule(name)
            if not isinstance(module, SUPPORTED):
                raise UnsupportedModuleError(f"Config records {name!r} as compressed, but it is a {type(module).__name__}.")
            kind = record.get("type")
            if kind not in MODULE_TYPES:
                raise CheckpointError(f"Module {name!r} has unknown compressed type {kind!r} (newer hf-compress?).")
            out_f, in_f = shape_of(module)
            ref = module.weight
            try:
                new = MODULE_TYPES[kind].from_record(record, in_f, out_f, device="meta", dtype=ref.dtype)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"Config record of {name!r} is invalid: {e}") from None
            for tensor, shape in new.expected_tensors().items():
                key = _find_key(headers, f"{name}.{tensor}", prefix)
                if key is None:
                    raise CheckpointError(f"Checkpoint lacks tensor {name}.{tensor} recorded in its config.")
                found = tuple(headers[key]["shape"])
                if found != shape:
                    raise CheckpointError(
                        f"Tensor {key} has shape {found}, but the config ({record}) and the model "
                        f"({out_f}x{in_f}) imply {shape}."
                    )
            set_module(model, name, new)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .auto import use_compressed_config_class
        from .pipelines import compress_modules
        from .kv.hook import after_weight_loading as kv_after_weight_loading, kv_only

        if not self.pre_quantized and not kv_only(self.quantization_config):
            compress_modules(model, self.quantization_config)
        refresh_records(model, self.quantization_config)
        use_compressed_config_class(model)
        kv_after_weight_loading(model, self.quantization_config)  # KV cache used by generate() by default
        from .hub import bind

        bind(model)  # model.push_to_hub writes our model card
        return model

    def get_state_dict_and_metadata(self, model):
        # Called by save_pretrained before config.json is written: record what the model holds *now*
        # (a merge of adapters may have changed ranks since loading).
        refresh_records(model, self.quantization_config)
        return None, {"hf_compress_version": __version__}

    def _dequantize(self, model, dtype=None):
        from .hub import unbind

        from .modules.experts import unsplit_untouched

        for name, module in compressed_modules(model).items():
            set_module(model, name, module.to_dense())
        unsplit_untouched(model)  # experts back in the model's fused module
        unbind(model)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _split_recorded_experts(model, records: dict, prefix: str) -> None:
    """Give every fused experts module that holds a recorded (compressed) expert its per-expert form, empty on the
    meta device, so that the records resolve to its layers (`hf_compress.modules.experts`)."""
    from .modules.experts import CompressedExperts, is_fused_experts

    fused = {n: m for n, m in model.named_modules() if is_fused_experts(m)}
    if not fused:
        return
    wanted = set()
    for recorded in records:
        for candidate in (recorded, recorded.removeprefix(prefix + "."), f"{prefix}.{recorded}") if prefix else (recorded,):
            wanted.update(n for n in fused if candidate.startswith(n + "."))
    for name in wanted:
        model.set_submodule(name, CompressedExperts.empty_like(fused[name]))


def _resolve_module_name(model, name: str, prefix: str) -> str | None:
    """The module's name in ``model``, allowing for a head model's checkpoint loaded into its base model and back."""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return None


def _find_key(headers: dict, key: str, prefix: str) -> str | None:
    for candidate in (key, f"{prefix}.{key}" if prefix else None,
                      key.removeprefix(prefix + ".") if prefix else None):
        if candidate and candidate in headers:
            return candidate
    return None
