"""`LowRankLinear`: y = (x·Vᵀ)·Uᵀ + b.

Deliberately *not* an `nn.Linear` subclass (see `CompressedModule`). It replaces `nn.Linear` and GPT-2's `Conv1D`
(whose weight is stored transposed); `source` remembers which, so `to_dense()` can give the original module type back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import lowrank_linear
from .base import CompressedModule, LowRankPath

SOURCES = ("linear", "conv1d")


class LowRankLinear(CompressedModule, LowRankPath):
    """y = (x·Vᵀ)·Uᵀ + b with U [out, r], V [r, in] (r >= 1). The factors change only through `LowRankPath`
    (`set_factors`, `append_rank`, `truncate_rank`)."""

    type_name = "lowrank"
    min_rank = 1  # the path is the whole layer

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        source: str = "linear",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rank <= 0 or rank > min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, min(out, in)] = [1, {min(in_features, out_features)}], got {rank}"
            )
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.source = in_features, out_features, source
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self._kernel_cache: dict = {}  # the CPU backend's U by columns (`kernels.dispatch.lowrank_linear`); not state
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the layer's outputs (its factors'), read without computing `weight`."""
        return self.U.dtype

    def reset_parameters(self):
        if self.U.is_meta:
            return
        # Same scale as nn.Linear's default init of the product, split over the two factors.
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, source: str = "linear",
                     dtype=None, device=None) -> "LowRankLinear":
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"factor shapes do not chain: U {tuple(u.shape)}, V {tuple(v.shape)}")
        dtype = dtype or u.dtype
        device = device or u.device
        module = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None, source=source, device="meta")
        module.set_factors(u, v, requires_grad=True, dtype=dtype, device=device)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone())
        return module

    def _factors_changed(self) -> None:
        self._kernel_cache.clear()  # the CPU backend's column copy of U (rebuilt at the next forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.U, self.V, self.bias, cache=self._kernel_cache)

    @property
    def weight(self) -> torch.Tensor:
        """Dense [out, in] product U·V, computed on access (read-only: writing into it changes nothing).

        Exists because some code reads ``module.weight`` for dtype/device or initialisation (GPT-2's
        ``_init_weights`` touches ``c_proj.weight``)."""
        return self.U @ self.V

    def to_dense(self) -> nn.Module:
        """The equivalent dense module (`nn.Linear`, or `Conv1D` when this replaced one)."""
        with torch.no_grad():
            w = (self.U.float() @ self.V.float()).to(self.U.dtype)
        return dense_module(w, self.bias, self.source)

    def record(self) -> dict:
        """What the config stores about this module (checked against the checkpoint's tensors on load)."""
        return {"type": self.type_name, "rank": self.rank, "source": self.source, "bias": self.bias is not None}

    @classmethod
    def from_record(cls, record: dict, in_features: int, out_features: int, device=None, dtype=None):
        return cls(in_features, out_features, int(record["rank"]), bias=bool(record.get("bias", True)),
                   source=record.get("source", "linear"), device=device, dtype=dtype)

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        shapes = {"U": (self.out_features, self.rank), "V": (self.rank, self.in_features)}
        if self.bias is not None:
            shapes["bias"] = (self.out_features,)
        return shapes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}" + (", source=conv1d" if self.source == "conv1d" else ""))


def dense_module(w: torch.Tensor, bias: torch.Tensor | None, source: str) -> nn.Module:
    """`nn.Linear` (or GPT-2 `Conv1D` when ``source`` is "conv1d") holding ``w`` [out, in] and ``bias``."""
    out_f, in_f = w.shape
    with torch.no_grad():
        if source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(out_f, in_f).to(device=w.device, dtype=w.dtype)
            dense.weight.copy_(w.T)
            if bias is None:
                dense.bias = None
        else:
            dense = nn.Linear(in_f, out_f, bias=bias is not None, device=w.device, dtype=w.dtype)
            dense.weight.copy_(w)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense
