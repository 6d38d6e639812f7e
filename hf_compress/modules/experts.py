"""Fused mixture-of-experts weights as one layer per expert: `CompressedExperts` and `ExpertLinears`.

In transformers 5 a mixture-of-experts block keeps its experts in an ``*Experts`` module (``Qwen3MoeExperts``,
``MixtralExperts``, ``GptOssExperts``, ...) as 3-D parameters — ``gate_up_proj`` [E, 2I, H] (or ``up_proj``
[E, I, H] without a gate) and ``down_proj`` [E, H, I], transposed in some models ([E, in, out], gpt-oss), with
optional ``*_bias`` [E, out] — and runs them through `transformers.integrations.moe` (`use_experts_implementation`,
`ExpertsInterface`, ``config._experts_implementation``).

`CompressedExperts` is that module with each 3-D weight split into an `ExpertLinears`: E layers [out, in], one per
expert (``experts.gate_up_proj.3`` is expert 3's gate/up projection). Each starts as an `nn.Linear` holding the
expert's slice (with its bias) and is replaced like any linear target by a `QuantLinear`, `LowRankLinear` or
`QuantLowRankLinear`, so every weight method, the statistics hooks, checkpoints (one record and tensor set per
expert), loading, the kernels and PEFT treat an expert as the linear layer it is. The class is built with
transformers' public decorator `use_experts_implementation` and its own `ExpertsInterface`
(`COMPRESSED_EXPERTS_FUNCTIONS`), as transformers' own FP8 experts are: whatever ``experts_implementation`` the
model asks for, compressed experts run `compressed_experts_forward` (routed tokens only, each expert through its
layer's kernels), and the model keeps its class. The gate (``_apply_gate``: SwiGLU, gpt-oss's clamped variant, ...)
and the activation are the native module's own. `to_native` rebuilds the native module from dense slots.

Calibration: the hooks on an expert's layer see the tokens the router sends to it (``routed``); with
``calibrate_all`` set (`calibrating_all_experts`), every expert also runs on every token so that its statistics
cover them all, while the block's output still uses only the routed ones (llm-compressor's
``calibrate_all_experts``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation

#: the 3-D weights a fused experts module may hold, in the order an expert applies them
WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")
_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused experts module (3-D expert weights behind
    `use_experts_implementation`), not yet split into per-expert layers."""
    if isinstance(module, CompressedExperts) or not hasattr(module, "num_experts"):
        return False
    weights = [getattr(module, n, None) for n in WEIGHT_NAMES]
    return (any(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights)
            and all(hasattr(module, f) for f in ("has_gate", "is_transposed")))


class ExpertLinears(nn.ModuleList):
    """The E per-expert layers [out, in] that stand for one 3-D weight of a fused experts module."""


def is_expert_layer(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` of ``model`` is one expert's layer (a member of an `ExpertLinears`)."""
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), ExpertLinears)


def compressed_experts_forward(self: "CompressedExperts", hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output for the router's choice: each expert hit runs on its tokens through its own layers
    (compressed or dense), its output weighted by the routing weight and summed per token in fp32. One token (a
    batch-1 decode step) takes `_one_token`, the same sums in the same order without the routing masks."""
    if hidden_states.shape[0] == 1 and not self.calibrate_all:
        return _one_token(self, hidden_states, top_k_index, top_k_weights)
    return _routed(self, hidden_states, top_k_index, top_k_weights)


def _routed(self: "CompressedExperts", hidden_states: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor) -> torch.Tensor:
    """`compressed_experts_forward` for any number of tokens: each expert hit, in expert order, on its tokens."""
    final = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    n = self.num_experts
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)  # [E+1, k, T]
        hit = mask.sum(dim=(-1, -2)).nonzero().flatten().tolist()
    run_all = self.calibrate_all
    for e in range(n) if run_all else hit:
        if e >= n:  # expert-parallel sentinel
            continue
        pos, tok = torch.where(mask[e])
        if run_all:
            y = self.expert(e, hidden_states)[tok]  # the hooks see every token; the output keeps the routed ones
        else:
            y = self.expert(e, hidden_states[tok])
        weighted = y * top_k_weights[tok, pos, None].to(y.dtype)
        final.index_add_(0, tok, weighted.to(torch.float32))
    return final.to(hidden_states.dtype)


def _one_token(self: "CompressedExperts", hidden_states: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> torch.Tensor:
    """`compressed_experts_forward` for one token: its routed experts in the order `_routed` adds them (expert,
    then slot), the weighted outputs summed in fp32 in that order as ``index_add_`` sums them (from the first one,
    not from zeros: the same values), so the result is `_routed`'s bit for bit (an expert that a router picks twice
    for the token runs once per pick), without the one-hot mask, the gathers and the scatter."""
    # (each tensor op costs a few us at one token, a third of the experts' time: none here that changes nothing)
    routes = sorted((e, pos) for pos, e in enumerate(top_k_index.tolist()[0]) if e < self.num_experts)
    final = weights = None
    for e, pos in routes:
        y = self.expert(e, hidden_states)
        if weights is None or weights[0] is not y.dtype:
            # the routing weights as Python numbers, rounded to y's dtype first: y times one of them is y times the
            # 0-d tensor `_routed` uses (one product in the op's fp32 arithmetic, rounded to y's dtype)
            w = top_k_weights if top_k_weights.dtype is y.dtype else top_k_weights.to(y.dtype)
            weights = (y.dtype, w.tolist()[0])
        part = y * weights[1][pos]
        if part.dtype is not torch.float32:
            part = part.float()
        # the first part stands for fp32 zeros plus it (equal; a -0.0 alone would read +0.0 there)
        final = part if final is None else final.add_(part)
    if final is None:
        return torch.zeros_like(hidden_states)
    return final if final.dtype is hidden_states.dtype else final.to(hidden_states.dtype)


class CompressedExpertsInterface(ExpertsInterface):
    """Experts implementations for `CompressedExperts`. Every name a model may be set to (``eager``,
    ``grouped_mm``, ``batched_mm``, ...) runs the per-expert path: the fused kernels read 3-D weights that compressed
    experts no longer have."""

    _global_mapping = {"hf_compress": compressed_experts_forward}

    def get_interface(self, experts_implementation, default):
        # asked at every forward: membership tests, not `get` (a KeyError raised and caught for "eager")
        for key in (experts_implementation, "hf_compress"):
            if key in self._local_mapping:
                return self._local_mapping[key]
            if key in self._global_mapping:
                return self._global_mapping[key]


COMPRESSED_EXPERTS_FUNCTIONS = CompressedExpertsInterface()


class CompressedExperts(nn.Module):
    """A fused experts module split into one layer per expert (see the module docstring). Build it with
    `from_native` (from a transformers ``*Experts`` module) or `empty_like` (on the meta device, to load into)."""

    def __init__(self, config, native_class: type, num_experts: int, weights: dict[str, ExpertLinears]):
        super().__init__()
        self.config = config
        self.native_class = native_class
        self.num_experts = num_experts
        self.calibrate_all = False
        for name, layers in weights.items():
            setattr(self, name, layers)

    @property
    def weight_names(self) -> list[str]:
        return [n for n in WEIGHT_NAMES if isinstance(getattr(self, n, None), ExpertLinears)]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on the rows ``x`` [tokens, hidden]."""
        if self.has_gate:
            h = self._apply_gate(self.gate_up_proj[e](x))
        else:
            h = self.act_fn(self.up_proj[e](x))
        y = self.down_proj[e](h)
        return self.post_expert_norm(y) if self.has_post_expert_norm else y

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.native_class._apply_gate(self, gate_up)  # the model's own gate (SwiGLU, clamped, interleaved)

    # ------------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_native(cls, native: nn.Module) -> "CompressedExperts":
        """Split ``native`` (a fused ``*Experts`` module) into per-expert `nn.Linear` layers holding copies of its
        slices; its other attributes and submodules (activation, norms) are kept. When accelerate offloaded
        ``native`` (weights on ``meta``, read through its hook), the layers are offloaded too: each reads its slice
        through a hook of its own (`offloaded_slots`), and nothing is read now."""
        if _offload_hook(native) is not None:
            new = cls.empty_like(native)
            new.__dict__["_offloaded_native"] = native  # given back untouched by `to_native`
            offloaded_slots(new, _offload_hook(native))
            return new
        layers = {}
        with torch.no_grad():
            for name in WEIGHT_NAMES:
                w = getattr(native, name, None)
                if not isinstance(w, torch.Tensor):
                    continue
                bias = getattr(native, f"{name}_bias", None) if native.has_bias else None
                layers[name] = ExpertLinears(_slot(w[e].T if native.is_transposed else w[e],
                                                   None if bias is None else bias[e])
                                             for e in range(w.shape[0]))
        return cls._around(native, layers)

    @classmethod
    def empty_like(cls, native: nn.Module) -> "CompressedExperts":
        """Like `from_native`, with empty slots on the meta device (filled by loading a checkpoint)."""
        layers = {}
        for name in WEIGHT_NAMES:
            w = getattr(native, name, None)
            if not isinstance(w, torch.Tensor):
                continue
            out_f, in_f = (w.shape[2], w.shape[1]) if native.is_transposed else (w.shape[1], w.shape[2])
            layers[name] = ExpertLinears(nn.Linear(in_f, out_f, bias=native.has_bias, device="meta", dtype=w.dtype)
                                         for _ in range(w.shape[0]))
        return cls._around(native, layers)

    @classmethod
    def _around(cls, native: nn.Module, layers: dict[str, ExpertLinears]) -> "CompressedExperts":
        new = cls(native.config, type(native), native.num_experts, layers)
        for flag in _FLAGS:
            setattr(new, flag, getattr(native, flag, False))
        new._is_expert_parallel = getattr(native, "_is_expert_parallel", False)
        skip = set(WEIGHT_NAMES) | {f"{n}_bias" for n in WEIGHT_NAMES}
        for key, value in vars(native).items():  # the gate's constants (gpt-oss: alpha, limit), sizes
            if (not key.startswith("_") and key not in skip and key not in vars(new) and key != "training"
                    and not callable(value)):  # not an offload hook's replacement forward
                setattr(new, key, value)
        for key, child in native.named_children():  # activation, post-expert norm
            setattr(new, key, child)
        new.train(native.training)
        return new

    def to_native(self) -> nn.Module:
        """The fused module of ``native_class`` holding the dense experts (compressed ones dequantized); for an
        offloaded module nothing was compressed in, the original offloaded module."""
        original = self.__dict__.get("_offloaded_native")
        if original is not None and not any(not isinstance(m, nn.Linear) for n in self.weight_names
                                            for m in getattr(self, n)):
            return original
        with torch.device("meta"):
            native = self.native_class(self.config)
        for flag in _FLAGS:
            setattr(native, flag, getattr(self, flag))
        with torch.no_grad():
            for name in self.weight_names:
                dense = [_dense_of(layer) for layer in getattr(self, name)]
                w = torch.stack([d.weight.T if self.is_transposed else d.weight for d in dense])
                setattr(native, name, nn.Parameter(w.contiguous(), requires_grad=False))
                if self.has_bias:
                    setattr(native, f"{name}_bias",
                            nn.Parameter(torch.stack([d.bias for d in dense]).contiguous(), requires_grad=False))
        for key, child in self.named_children():
            if key not in self.weight_names:
                setattr(native, key, child)
        return native.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.native_class.__name__}, num_experts={self.num_experts}, weights={self.weight_names}"


    forward = compressed_experts_forward


# transformers' experts decorator with our interface, as its own FP8 experts use it (the class is changed in place);
# the flags it sets are overwritten per instance from the native module (`_around`)
use_experts_implementation(CompressedExperts, experts_interface=COMPRESSED_EXPERTS_FUNCTIONS)


def _offload_hook(module: nn.Module):
    """accelerate's offloading hook of ``module`` when its weights live in an offload store, else None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])  # a SequentialHook holds several
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


class _ExpertSlices:
    """The weights map of one offloaded expert layer: ``weight`` (and ``bias``) are expert ``index``'s slice of the
    fused module's 3-D tensors in the offload store. The last few fused tensors read are kept (`_FUSED_CACHE`), so
    that running a block's experts reads each of its fused weights once: one block's dense experts in memory."""

    def __init__(self, fused_map, name: str, index: int, transposed: bool, has_bias: bool):
        self.fused_map, self.name, self.index, self.transposed = fused_map, name, index, transposed
        self.keys_ = ("weight", "bias") if has_bias else ("weight",)

    def _fused(self, key: str) -> torch.Tensor:
        cache_key = (id(self.fused_map), key)
        hit = _FUSED_CACHE.pop(cache_key, None)
        if hit is None or hit[0] is not self.fused_map:
            hit = (self.fused_map, self.fused_map[key])
        _FUSED_CACHE[cache_key] = hit  # most recent last
        while len(_FUSED_CACHE) > _FUSED_CACHE_SIZE:
            _FUSED_CACHE.pop(next(iter(_FUSED_CACHE)))
        return hit[1]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "weight":
            w = self._fused(self.name)[self.index]
            return w.T if self.transposed else w
        if key == "bias" and "bias" in self.keys_:
            return self._fused(f"{self.name}_bias")[self.index]
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        return key in self.keys_

    def keys(self):
        return self.keys_


#: fused offloaded tensors last read by `_ExpertSlices`: (weights map, tensor) by (id(map), name); 4 = a module's
#: gate_up, down and their biases
_FUSED_CACHE: dict = {}
_FUSED_CACHE_SIZE = 4


def offloaded_slots(experts: "CompressedExperts", hook) -> None:
    """Give each (meta) expert layer of ``experts`` an accelerate offloading hook that reads its slice of the fused
    weights from ``hook``'s offload store (`_ExpertSlices`)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for name in experts.weight_names:
        for e, layer in enumerate(getattr(experts, name)):
            slices = _ExpertSlices(hook.weights_map, name, e, experts.is_transposed, layer.bias is not None)
            add_hook_to_module(layer, AlignDevicesHook(execution_device=hook.execution_device, offload=True,
                                                       io_same_device=False, weights_map=slices))


def release_offloaded_reads() -> None:
    """Forget the fused tensors `_ExpertSlices` kept (called when a compression run ends)."""
    _FUSED_CACHE.clear()


def _slot(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    layer.weight.data = w.detach().clone().contiguous()
    layer.weight.requires_grad_(False)
    if bias is not None:
        layer.bias.data = bias.detach().clone()
        layer.bias.requires_grad_(False)
    return layer


def _dense_of(layer: nn.Module) -> nn.Linear:
    return layer if isinstance(layer, nn.Linear) else layer.to_dense()


@contextlib.contextmanager
def calibrating_all_experts(module: nn.Module, enabled: bool = True):
    """Within the block, every `CompressedExperts` runs all its experts on all tokens (their hooks see every
    token; the output keeps the routed ones)."""
    found = [m for m in module.modules() if isinstance(m, CompressedExperts)] if enabled else []
    for m in found:
        m.calibrate_all = True
    try:
        yield
    finally:
        for m in found:
            m.calibrate_all = False


def split_experts(model: nn.Module, names=None) -> list[str]:
    """Replace every fused experts module of ``model`` (or those named in ``names``) by a `CompressedExperts` with
    dense per-expert slots; returns the names replaced."""
    done = []
    for name, module in list(model.named_modules()):
        if is_fused_experts(module) and (names is None or name in names):
            model.set_submodule(name, CompressedExperts.from_native(module))
            done.append(name)
    return done


def unsplit_untouched(model: nn.Module) -> list[str]:
    """Put back the native fused module wherever a `CompressedExperts` holds no compressed layer (nothing of it was
    compressed): the model is then exactly as it was there. Returns the names restored."""
    from .base import CompressedModule

    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, CompressedExperts) and not any(isinstance(m, CompressedModule) for m in module.modules()):
            model.set_submodule(name, module.to_native())
            restored.append(name)
    release_offloaded_reads()
    return restored
