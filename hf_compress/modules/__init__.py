"""Compressed modules: storage + forward only. Algorithms that fill them live in `hf_compress.methods`;
the kernels that run them in `hf_compress.kernels`."""

from .lowrank import LowRankLinear

#: module type name (as stored in the config's ``modules`` record) -> class
MODULE_TYPES = {"lowrank": LowRankLinear}

__all__ = ["LowRankLinear", "MODULE_TYPES"]
