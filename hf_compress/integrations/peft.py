"""LoRA on hf-compress layers, registered with PEFT on ``import hf_compress``.

PEFT dispatches custom layer types through ``LoraConfig._register_custom_module`` — a per-config registration
that is not saved in ``adapter_config.json``. So that ``get_peft_model``, ``PeftModel.from_pretrained`` and
transformers' ``model.load_adapter`` all find our LoRA layer without the user registering anything, every
`LoraConfig` built after ``import hf_compress`` (including the ones PEFT reads back from disk) gets the mapping
in its ``__post_init__``. Our layers are not ``nn.Linear`` subclasses, so PEFT's default dispatch never takes
them by accident.

`LoraCompressedLinear` is PEFT's own ``lora.Linear`` (forward, dropout, scaling, mixed-adapter batches,
saving) with the merge rewritten so that it never densifies:

* `LowRankLinear` (y = U·V·x): merging appends the adapter as extra rank: U ← [U, s·B], V ← [V; A] (rank r + r_lora,
  exact);
* `QuantLinear` with a low-rank path (EoRA): the adapter joins that path the same way (exact, no re-quantization;
  quantized EoRA factors are first stored as the exact values they dequantize to, in the compute dtype);
* pure `QuantLinear`: the adapter *becomes* its low-rank path (exact; the codes are untouched);
* `QuantLowRankLinear` (quantized factors): no exact merge exists without a full-precision path, so merging raises
  and says what to do (keep the adapter unmerged, or dequantize first).

Mixture-of-experts experts split by hf-compress (`CompressedExperts`) are plain per-expert layers to PEFT:
``target_module_names(model, experts=True)`` targets them; PEFT's parameter targeting of fused 3-D expert weights
(``target_parameters``) has nothing left to wrap there and is refused by name
(`refuse_compressed_expert_parameters`, run inside PEFT's ``LoraModel._inject_parameters``).

The factors change only through the modules' own `LowRankPath` methods (``append_rank`` / ``truncate_rank`` /
``set_factors``), which keep them contiguous, frozen and in the path's dtype and drop derived runtime copies. Unmerge
removes exactly the appended rank. `squeeze` re-truncates a merged layer back to a target rank
(LoRA-Squeeze style: SVD of the product of the factors, computed through QR of each factor).
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from hf_compress.modules import (LowRankLinear, LowRankPath, QuantLinear, QuantLowRankLinear,
                                 compressed_modules)

COMPRESSED_TYPES = (LowRankLinear, QuantLinear, QuantLowRankLinear)


class LoraCompressedLinear(LoraLinear):
    """PEFT LoRA layer around an hf-compress module (frozen base, trainable A/B)."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        if config.use_dora or getattr(config, "velora_config", None) is not None:
            raise ValueError("hf-compress layers support plain LoRA only (no DoRA / VeLoRA: they need the dense "
                             "weight's norms)")
        if config.lora_bias:
            raise ValueError("hf-compress layers do not support lora_bias")
        kwargs.pop("is_target_conv_1d_layer", None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # our modules compute y = W·x whatever layer they replaced (GPT-2 Conv1D too)
        self._merged_ranks: dict[str, tuple[int, int]] = {}

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """The dense [out, in] update s·B·A (for inspection; merging never materialises it)."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            b = self.lora_B[name].weight.detach() * self.scaling[name]
            a = self.lora_A[name].weight.detach()
            if safe_merge and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"NaNs detected in adapter {name!r}; not merging it")
            start = append_rank(base, b, a)
            self._merged_ranks[name] = (start, start + a.shape[0])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            start, end = self._merged_ranks.pop(name)
            remove_rank(base, start, end)


def append_rank(base: nn.Module, b: torch.Tensor, a: torch.Tensor) -> int:
    """Append rank-r factors (b [out, r], a [r, in]) to the low-rank path of ``base``; return where they start
    (`LowRankPath.append_rank`)."""
    if isinstance(base, QuantLowRankLinear):
        raise ValueError(
            "Cannot merge a LoRA adapter exactly into a QuantLowRankLinear (its factors are quantized): keep the "
            "adapter unmerged (PeftModel / model.load_adapter), or dequantize the model before merging.")
    if not isinstance(base, LowRankPath):
        raise TypeError(f"not an hf-compress layer: {type(base).__name__}")
    return base.append_rank(b, a)


def remove_rank(base: nn.Module, start: int, end: int) -> None:
    """Remove the rank ``start``..``end`` that `append_rank` appended last (`LowRankPath.truncate_rank`; frozen)."""
    u = base.U
    if u is None or u.shape[1] != end:
        raise RuntimeError(f"cannot unmerge: the layer's rank is {0 if u is None else u.shape[1]}, expected {end}")
    base.truncate_rank(start, requires_grad=False)


def squeeze(module: nn.Module, rank: int) -> None:
    """Re-truncate the low-rank path of a `LowRankLinear` / `QuantLinear` to ``rank`` (best approximation of U·V,
    via QR of each factor and the SVD of the small core; √Σ split evenly)."""
    if isinstance(module, QuantLinear) and module.factor_bits and rank < module.rank:
        module.dequantize_factors()
    if module.U is None or rank >= module.U.shape[1]:
        return
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, v = module.U.detach().double(), module.V.detach().double()
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v.T)
    uu, s, vh = torch.linalg.svd(ru @ rv.T)
    root = s[:rank].sqrt()
    dtype = module.U.dtype
    module.set_factors((qu @ uu[:, :rank] * root).to(dtype), (root[:, None] * vh[:rank] @ qv.T).to(dtype))


def squeeze_model(model: nn.Module, rank: int) -> None:
    """`squeeze` every low-rank path of ``model`` down to at most ``rank``."""
    for module in compressed_modules(model).values():
        if isinstance(module, LowRankPath):
            squeeze(module, rank)


def target_module_names(model: nn.Module, experts: bool = False) -> list[str]:
    """The full names of the compressed layers: a ready ``LoraConfig(target_modules=...)`` that matches exactly
    those (PEFT matches a name or a ``.``-suffix, so a leaf name such as ``dense`` would also catch layers that were
    never compressed). The layers of mixture-of-experts experts are left out unless ``experts``: an adapter per
    expert multiplies the trainable parameters by the number of experts; attention and shared layers are the
    usual LoRA targets of a MoE model."""
    from ..modules.experts import is_expert_layer

    return [n for n in compressed_modules(model) if experts or not is_expert_layer(model, n)]


def prepare_for_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                         gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """What PEFT's ``prepare_model_for_kbit_training`` does for bitsandbytes, for hf-compress models: freeze
    every base parameter, upcast fp16/bf16 parameters outside the compressed layers (norms, embeddings, head) to
    fp32 for stable training, and enable gradient checkpointing with input gradients (non-reentrant)."""
    inside = set()
    for module in compressed_modules(model).values():
        inside.update(id(p) for p in module.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in inside:
            p.data = p.data.float()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        kw = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


_MAPPING = {cls: LoraCompressedLinear for cls in COMPRESSED_TYPES}


def refuse_compressed_expert_parameters(model: nn.Module, target_parameters) -> None:
    """PEFT's parameter targeting (``LoraConfig(target_parameters=["experts.gate_up_proj", ...])``) wraps a module's
    3-D ``nn.Parameter`` — transformers' fused experts. hf-compress has split the experts it compressed into one layer
    per expert (`CompressedExperts`), so those parameters no longer exist and PEFT would match nothing (an error, or
    only a warning when ``target_modules`` matched something). Raise instead, naming the weights and what to do.
    Experts left dense (fused) are still PEFT's to target."""
    from ..errors import UnsupportedModuleError
    from ..modules.experts import CompressedExperts

    targets = list(target_parameters or [])
    if not targets:
        return
    hits = []
    for name, module in model.named_modules():
        if not isinstance(module, CompressedExperts):
            continue
        for weight in module.weight_names + [f"{w}_bias" for w in module.weight_names]:
            key = f"{name}.{weight}".replace(".base_layer", "")
            if any(key == t or key.endswith(f".{t}") for t in targets):
                hits.append(key)
    if hits:
        raise UnsupportedModuleError(
            f"target_parameters {targets} name the fused 3-D expert weights of {len(hits)} mixture-of-experts "
            f"modules (e.g. {hits[0]}), which hf-compress has split into one compressed layer per expert "
            "(CompressedExperts): there is no 3-D nn.Parameter left for PEFT's parameter targeting to wrap. Target "
            "the expert layers as modules instead — LoraConfig(target_modules=target_module_names(model, "
            "experts=True)) from hf_compress.integrations.peft puts one LoRA on each expert's compressed layer — or "
            "compress with skip=['experts'] to keep the fused experts for target_parameters.")


def register() -> None:
    """Make every LoraConfig (new or read from disk) dispatch hf-compress layers to `LoraCompressedLinear`, and make
    LoRA's parameter targeting refuse compressed experts by name (`refuse_compressed_expert_parameters`)."""
    if getattr(LoraConfig, "_hf_compress_registered", False):
        return
    from peft.tuners.lora import LoraModel

    original = LoraConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._register_custom_module(dict(_MAPPING))

    LoraConfig.__post_init__ = __post_init__
    LoraConfig._hf_compress_registered = True
    # PEFT's BaseTuner._inject_parameters does the parameter targeting (tests/test_moe_ecosystem.py names it)
    inject = LoraModel._inject_parameters

    def _inject_parameters(self, peft_config, model, *args, **kwargs):
        refuse_compressed_expert_parameters(model, getattr(peft_config, "target_parameters", None))
        return inject(self, peft_config, model, *args, **kwargs)

    LoraModel._inject_parameters = _inject_parameters
    # PEFT rewrites a transformers-4 era config for MoE model types (``gate_proj`` / ``down_proj`` names become
    # ``target_parameters`` on the fused experts) before injecting. On a model whose experts hf-compress split, the
    # names are the model's own (`target_module_names`): that rewrite would move LoRA from dense MLP / shared-expert
    # layers onto experts that no longer exist. PEFT imports the function at call time (tests/test_moe_ecosystem.py
    # names it).
    from peft.utils import transformers_weight_conversion as conversion

    convert = conversion.convert_peft_config_for_transformers

    def convert_peft_config_for_transformers(peft_config, model, *args, **kwargs):
        from ..modules.experts import CompressedExperts

        if any(isinstance(m, CompressedExperts) for m in model.modules()):
            return None
        return convert(peft_config, model, *args, **kwargs)

    conversion.convert_peft_config_for_transformers = convert_peft_config_for_transformers
