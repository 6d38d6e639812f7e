"""Building compressed modules from a method's result, and swapping them into the model.

`replace` reads a target's dense weight (through accelerate's offload hooks), asks the method for its fit and
has the builder of the target's kind (`BUILDERS`) make the module: `LowRankLinear` from factors, `QuantLinear`
from codes (with float or quantized EoRA factors), `QuantLowRankLinear` from quantized factors. A new kind of
target (fused mixture-of-experts weights) is a new entry in `BUILDERS`. `correct` refits a layer that stays dense.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import align_module_device
from torch import nn

from .calibration import LayerStats
from .kernels import pack
from .methods import get_method
from .methods.eora import eora_factors
from .modules import LowRankLinear, QuantLinear, QuantLowRankLinear
from .modules.quant import WEIGHT_SCALE_DTYPES
from .targets import Target, dense_weight, is_offloaded, set_module, source_of

logger = logging.getLogger(__name__)


def replace(model: nn.Module, target: Target, method, config, rank, stats=None, heldout=None):
    """Swap the dense layer ``target`` for its compressed form. ``rank``: the low-rank rank, or for a quantization
    method the EoRA rank (0: none). Returns what the method chose for the layer (`Factors.choice`), or None."""
    module, choice = BUILDERS[target.kind](target, method, config, rank, stats, heldout)
    # For an offloaded layer the (smaller) compressed module is made on the hook's execution device; with a
    # checkpoint folder, once its block is written there it is read from that file (`Checkpoint.release_unit`).
    set_module(model, target.name, module)
    return choice


def _linear(target: Target, method, config, rank, stats, heldout):
    """A Linear / Conv1D target: (its compressed module, the method's choice)."""
    module = target.module
    weight = target.weight(check=False)  # checked with every target before any is replaced (`compress_modules`)
    with align_module_device(module):
        bias = None if module.bias is None else module.bias.detach().clone()
    kw = {"source": source_of(module), "dtype": weight.dtype, "device": weight.device}
    choice = None
    with torch.no_grad():
        if method.family == "quant":
            new = quantized(target.name, weight.float(), bias, method, config, rank, stats, **kw)
        else:
            fit = method.factorize(weight.float(), rank, stats, heldout)
            choice = getattr(fit, "choice", None)
            u, v = fit
            if config.bits is None:
                new = LowRankLinear.from_factors(u, v, bias, **kw)
            else:
                new = quantized_factors(u, v, bias, config, None if stats is None else stats.merged(heldout), **kw)
    return new, choice


#: target kind -> builder(target, method, config, rank, stats, heldout) -> (compressed module, method's choice)
BUILDERS = {"linear": _linear, "conv1d": _linear}


def correct(module: nn.Module, method, stats, heldout):
    """Let the method refit a layer that stays dense (in place; same shape, no parameter cost). Returns what the
    method chose for the layer, or None."""
    if is_offloaded(module):
        logger.info("not correcting an offloaded dense layer (its weights live in the offload store)")
        return None
    new, choice = method.dense_correction(dense_weight(module).detach().float(), stats, heldout)
    if new is not None:
        with torch.no_grad():
            dense_weight(module).copy_(new)
    return choice


def pack_layer(q, in_features: int, sdt, bias=None, u=None, v=None, **kw) -> QuantLinear:
    """A `QuantLinear` from a `Quantized` (codes packed), with optional float EoRA factors."""
    return QuantLinear.from_codes(pack(q.codes, q.bits), q.scales.to(sdt), q.zeros.to(sdt), q.bits, q.group_size,
                                  in_features, bias, u, v, **kw)


def quantized(name, w, bias, method, config, rank, stats, **kw) -> QuantLinear:
    """``w`` quantized by ``method``; with ``rank``, plus EoRA factors of its error (float, or quantized with
    ``config.eora_factor_bits``)."""
    sdt = WEIGHT_SCALE_DTYPES[config.scale_dtype]
    q = method.quantize(w, config.bits, config.group_size, stats, sdt)
    if not rank:
        return pack_layer(q, w.shape[1], sdt, bias, **kw)
    error = w - q.dequantize(w.shape[1])
    u, v = eora_factors(error, rank, None if stats is None else stats.gram, name)
    fb, fg = config.eora_factor_bits, config.eora_factor_group_size
    if not fb:
        return pack_layer(q, w.shape[1], sdt, bias, u, v, **kw)
    layer = pack_layer(q, w.shape[1], sdt, bias, **kw)
    layer.set_quantized_factors(*quantized_eora_factors(u, v, fb, fg, stats, sdt), fb, fg)
    return layer


def quantized_eora_factors(u, v, bits: int, group_size: int, stats, sdt):
    """Packed (qweight, scales, zeros) of Uᵀ [r, out] and of V [r, in], both rank-major. V (which sees the layer's
    inputs) is quantized by GPTQ on their Gram when there is one, HQQ otherwise; Uᵀ by HQQ. Every quantizer here
    works row by row, so the codes of the first k rows are those of the rank-k factors (truncation commutes)."""
    have_gram = stats is not None and stats.gram is not None
    qv = get_method("gptq" if have_gram else "hqq")().quantize(v, bits, group_size, stats if have_gram else None, sdt)
    qu = get_method("hqq")().quantize(u.T.contiguous(), bits, group_size, None, sdt)
    return tuple((pack(q.codes, bits), q.scales.to(sdt), q.zeros.to(sdt)) for q in (qu, qv))


def factor_quantizer(config, have_stats: bool):
    name = config.quantizer or ("gptq" if have_stats else "hqq")
    return get_method(name)()


def quantized_factors(u, v, bias, config, stats, **kw) -> QuantLowRankLinear:
    """Quantize V (input: the layer's x) then U (input: V̂x); a calibrated quantizer sees the Gram of each input,
    G for V and V̂·G·V̂ᵀ for U, so U also absorbs the rounding error of V."""
    sdt = WEIGHT_SCALE_DTYPES[config.scale_dtype]
    have_stats = stats is not None and stats.gram is not None
    quantizer = factor_quantizer(config, have_stats)
    qv = quantizer.quantize(v, config.bits, config.group_size, stats if have_stats else None, sdt)
    u_stats = None
    if have_stats:
        v_hat = qv.dequantize(v.shape[1]).double().to(stats.gram.device)
        u_stats = LayerStats(gram=v_hat @ stats.gram @ v_hat.T, count=stats.count)
    qu = quantizer.quantize(u, config.bits, config.group_size, u_stats, sdt)
    kw_q = {"dtype": kw["dtype"], "device": kw["device"]}
    return QuantLowRankLinear.from_parts(pack_layer(qv, v.shape[1], sdt, **kw_q), pack_layer(qu, u.shape[1], sdt, **kw_q),
                                         bias, source=kw["source"])
