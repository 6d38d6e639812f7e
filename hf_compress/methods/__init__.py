"""Compression methods: one file each, registered by name in `hf_compress.registry.METHODS`."""

from ..registry import METHODS
from .base import CompressionMethod, LowRankMethod
from . import asvd, fwsvd, svd, svd_llm  # noqa: F401  (each registers its method)


def get_method(name: str) -> type[CompressionMethod]:
    return METHODS.get(name)


def available_methods() -> list[str]:
    return METHODS.names()


__all__ = ["CompressionMethod", "LowRankMethod", "get_method", "available_methods"]
