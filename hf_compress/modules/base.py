"""What every compressed module promises (`CompressedModule`) and the one owner of a float low-rank path
(`LowRankPath`: the only code that replaces the ``U`` / ``V`` parameters of a layer after it is built).

`CompressedModule` declares the interface that loading (`hf_compress.quantizer`), saving, size accounting, export and
the PEFT integration rely on; `LowRankLinear`, `QuantLinear` and `QuantLowRankLinear` implement it. Its methods raise
`NotImplementedError` (no ABC metaclass on an `nn.Module`): a new module type that forgets one fails loudly at first
use.
"""

from __future__ import annotations

import torch
from torch import nn


class CompressedModule(nn.Module):
    """Base class of the hf-compress layers that replace a dense linear layer (`nn.Linear` or GPT-2's `Conv1D`).

    Deliberately *not* an `nn.Linear` subclass: PEFT's default LoRA dispatcher takes any `nn.Linear` subclass and would
    silently treat the module as dense (`hf_compress.integrations.peft` dispatches these types itself).

    The contract, for a layer computing y = W·x (+ b) with W [out_features, in_features]:

    * ``type_name`` (class attribute): the key of the layer type in the config's ``modules`` records
      (`hf_compress.modules.MODULE_TYPES`);
    * ``in_features`` / ``out_features``: the dense layer's shape;
    * ``source``: ``"linear"`` or ``"conv1d"``, the module type `to_dense` gives back; ``bias``: a parameter or None;
    * ``rank``, ``compute_dtype`` (the dtype of the outputs) and ``weight`` (the dense [out, in] weight, computed on
      access, read-only);
    * `record` / `from_record`: the JSON record the config stores, and the empty module built back from it (then
      filled from the checkpoint, whose tensors `expected_tensors` names and shapes);
    * `to_dense`: the equivalent dense module.

    Quantized layers also have ``bits_per_weight`` (storage bits per weight, bias excluded); `LowRankLinear` has not.
    """

    #: key in the config's ``modules`` records; set by every subclass
    type_name: str = ""
    in_features: int
    out_features: int

    def _missing(self, what: str):
        return NotImplementedError(f"{type(self).__name__} does not implement {what} (CompressedModule's contract)")

    @property
    def rank(self) -> int:
        """The rank of the layer's low-rank part (0 where it has none)."""
        raise self._missing("rank")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the layer's outputs, read without computing ``weight``."""
        raise self._missing("compute_dtype")

    def record(self) -> dict:
        """What the config stores about this module: a JSON-able dict with ``"type": type_name`` and whatever
        `from_record` needs to build an empty module of the same shapes (checked against the checkpoint's tensors on
        load)."""
        raise self._missing("record()")

    @classmethod
    def from_record(cls, record: dict, in_features: int, out_features: int, device=None, dtype=None):
        """An empty module (same tensor names and shapes as the one `record` came from, values to be loaded) for a
        dense layer of [out_features, in_features], its tensors on ``device`` (``"meta"`` too) in ``dtype``."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_record() (CompressedModule's contract)")

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """name (relative to the module) -> shape of every tensor the checkpoint must hold for this module."""
        raise self._missing("expected_tensors()")

    def to_dense(self) -> nn.Module:
        """The equivalent dense module: `nn.Linear`, or GPT-2's `Conv1D` when ``source`` is ``"conv1d"``."""
        raise self._missing("to_dense()")


class LowRankPath:
    """Mixin for a `CompressedModule` whose low-rank path is (or can be) two float parameters, ``U`` [out, r] and ``V``
    [r, in] (the path computes U·(V·x)): `LowRankLinear` (the whole layer) and `QuantLinear` (its EoRA compensation).

    `set_factors` is the one place that replaces them, and so owns the invariants: contiguous parameters, on the path's
    device in its dtype (the current factors', or the layer's when it has none), frozen unless asked otherwise, and
    the layer's runtime copies derived from them dropped (`_factors_changed`; the kernels' caches,
    `kernels.cache.reuse`, also notice a replaced tensor by themselves). `append_rank` and `truncate_rank` change the
    rank through it.
    """

    #: the smallest rank the path may have: 0 when the layer works without one (the path can be removed)
    min_rank = 0

    def _factor_placement(self) -> tuple[torch.dtype, torch.device]:
        """(dtype, device) new factors are stored in when none are given: the current factors'."""
        return self.U.dtype, self.U.device

    def _factors_changed(self) -> None:
        """Drop what the layer keeps derived from its factors (called after they are replaced)."""

    def _float_factors(self) -> None:
        """Turn a path stored otherwise (quantized factors) into float ``U`` / ``V`` (before appending rank)."""

    def set_factors(self, u: torch.Tensor | None, v: torch.Tensor | None, *, requires_grad: bool = False,
                    dtype: torch.dtype | None = None, device=None) -> None:
        """Replace the low-rank path by ``u`` [out, r] · ``v`` [r, in] (both None: remove it, where ``min_rank`` is 0).
        The factors are stored contiguous (sharing memory with ``u`` / ``v`` where they already are), in ``dtype`` on
        ``device`` (default: where the path is now), as parameters with ``requires_grad``."""
        if u is None or v is None:
            if u is not None or v is not None:
                raise ValueError("set_factors: give both factors, or neither (to remove the path)")
            if self.min_rank > 0:
                raise ValueError(f"{type(self).__name__} needs a low-rank path of rank >= {self.min_rank}")
            self.U = self.V = None
            self._factors_changed()
            return
        if (u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0] or u.shape[0] != self.out_features
                or v.shape[1] != self.in_features or u.shape[1] < max(self.min_rank, 1)):
            raise ValueError(f"factors U {tuple(u.shape)}, V {tuple(v.shape)} do not fit a layer of "
                             f"[out, in] = [{self.out_features}, {self.in_features}] (U [out, r], V [r, in], r >= 1)")
        if dtype is None or device is None:
            here_dtype, here_device = self._factor_placement()
            dtype, device = dtype or here_dtype, device or here_device
        self.U = nn.Parameter(u.detach().to(device=device, dtype=dtype).contiguous(), requires_grad=requires_grad)
        self.V = nn.Parameter(v.detach().to(device=device, dtype=dtype).contiguous(), requires_grad=requires_grad)
        self._factors_changed()

    def append_rank(self, u: torch.Tensor, v: torch.Tensor) -> int:
        """Append rank-k factors ``u`` [out, k], ``v`` [k, in] to the path (U ← [U, u], V ← [V; v]: the layer then
        computes W + u·v exactly, in the path's dtype); return the rank where they start. The result is frozen."""
        self._float_factors()
        dtype, device = self._factor_placement()
        u, v = u.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
        start = self.rank
        if self.U is not None:
            u, v = torch.cat([self.U.detach(), u], dim=1), torch.cat([self.V.detach(), v], dim=0)
        self.set_factors(u, v)
        return start

    def truncate_rank(self, rank: int, requires_grad: bool | None = None) -> None:
        """Keep the first ``rank`` components of the path (``min_rank`` .. the current rank; 0 removes it). The
        kept factors stay trainable or frozen as they were unless ``requires_grad`` says otherwise."""
        if not self.min_rank <= rank <= self.rank:
            raise ValueError(f"rank must be in [{self.min_rank}, {self.rank}], got {rank}")
        if rank == 0:
            self.set_factors(None, None)
        elif rank < self.rank:
            keep = requires_grad is None
            u_grad, v_grad = (self.U.requires_grad, self.V.requires_grad) if keep else (requires_grad, requires_grad)
            self.set_factors(self.U.detach()[:, :rank], self.V.detach()[:rank], requires_grad=u_grad)
            self.V.requires_grad_(v_grad)
