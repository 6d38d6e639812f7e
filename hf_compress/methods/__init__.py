"""Compression methods: one file each, registered by name in `hf_compress.registry.METHODS`."""

from ..registry import METHODS
from .base import CompressionMethod, LowRankMethod
from . import svd  # noqa: F401  (registers "svd")


def get_method(name: str) -> type[CompressionMethod]:
    return METHODS.get(name)


def available_methods() -> list[str]:
    return METHODS.names()


__all__ = ["CompressionMethod", "LowRankMethod", "get_method", "available_methods"]
