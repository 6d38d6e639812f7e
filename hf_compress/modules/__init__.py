"""Compressed modules: storage + forward only. Algorithms that fill them live in `hf_compress.methods`;
the kernels that run them in `hf_compress.kernels`."""

from .base import CompressedModule, LowRankPath
from .lowrank import LowRankLinear
from .quant import QuantLinear, QuantLowRankLinear

#: module type name (as stored in the config's ``modules`` record) -> class
MODULE_TYPES = {cls.type_name: cls for cls in (LowRankLinear, QuantLinear, QuantLowRankLinear)}


def compressed_modules(model) -> dict:
    """name -> module for every hf-compress module of ``model`` (not the parts inside one, such as the two
    `QuantLinear` factors of a `QuantLowRankLinear`)."""
    found: dict = {}
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, CompressedModule):
            found[name] = module
            inside += (name + ".",)
    return found


__all__ = ["CompressedModule", "LowRankLinear", "LowRankPath", "MODULE_TYPES", "compressed_modules", "QuantLinear",
           "QuantLowRankLinear"]
