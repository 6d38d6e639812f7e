"""Compression methods: one file each, registered by name in `hf_compress.registry.METHODS`."""

from ..registry import METHODS
from .base import CompressionMethod, LowRankMethod, QuantMethod
from . import asvd, fwsvd, gptq, hqq, rtn, svd, svd_llm  # noqa: F401  (each registers its method)


def get_method(name: str) -> type[CompressionMethod]:
    return METHODS.get(name)


def available_methods() -> list[str]:
    return METHODS.names()


__all__ = ["CompressionMethod", "LowRankMethod", "QuantMethod", "get_method", "available_methods"]
