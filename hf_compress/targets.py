"""Which modules a config targets, and how to read a dense [out, in] weight out of each supported type."""

from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, UnsupportedModuleError

SUPPORTED = (nn.Linear, Conv1D)
_BLOCK = re.compile(r"(^|\.)\d+\.")


def matches(name: str, pattern: str) -> bool:
    """PEFT-style: exact name or ``.``-suffix; globs with * ? [; ``re:`` for a full-match regex."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, targets: list[str] | None, skip: list[str]) -> dict[str, nn.Module]:
    """Modules to compress, in model order. Raises when a pattern matches nothing or an unsupported module."""
    found: dict[str, nn.Module] = {}
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if targets is None:
        for name, module in model.named_modules():
            if isinstance(module, SUPPORTED) and _BLOCK.search(name) and module is not output_embeddings:
                found[name] = module
        if not found:
            raise ConfigError(
                f"No nn.Linear/Conv1D inside repeated blocks of {type(model).__name__}; pass targets explicitly."
            )
    else:
        hit = {p: False for p in targets}
        for name, module in model.named_modules():
            pats = [p for p in targets if name and matches(name, p)]
            if not pats:
                continue
            for p in pats:
                hit[p] = True
            if not isinstance(module, SUPPORTED):
                raise UnsupportedModuleError(
                    f"Target pattern {pats[0]!r} matches {name!r}, a {type(module).__name__}; only nn.Linear and "
                    f"GPT-2 Conv1D can be compressed (target the linear layers inside it instead)."
                )
            found[name] = module
        missing = [p for p, h in hit.items() if not h]
        if missing:
            raise ConfigError(f"Target pattern(s) {missing} match no module of {type(model).__name__}.")
    for name in [n for n in found if any(matches(n, p) for p in skip)]:
        del found[name]
    if not found:
        raise ConfigError("Every targeted module is skipped: nothing to compress.")
    return found


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise UnsupportedModuleError(f"Cannot read a dense weight from {type(module).__name__}")


def source_of(module: nn.Module) -> str:
    return "conv1d" if isinstance(module, Conv1D) else "linear"


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return module.out_features, module.in_features


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
