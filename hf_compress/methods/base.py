"""The interface every compression method implements.

A method turns one dense weight (and, for calibrated methods, the statistics of that layer's inputs) into the
factors/codes of a compressed module; it never touches the model. The pipelines (`hf_compress.pipelines`) find
the targets, gather statistics block by block (`hf_compress.statistics`), ask the allocator for a budget per
layer (`hf_compress.allocation`), call the method, and have `hf_compress.factory` build the modules.

Every hook a pipeline calls is declared here, with its default: `spectrum`/`spectra`/`spectrum_from_outputs`
(allocation), `factorize` or `quantize` (the fit), `corrects_dense`/`dense_correction` (refitting a layer that
stays dense). What a method chooses for a layer (SVD-LLM's β) comes back in the call's result (`Factors.choice`,
`Correction.choice`); the pipelines read nothing off the method object.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch


class Factors(tuple):
    """What `LowRankMethod.factorize` returns: the pair (U [out, rank], V [rank, in]) — ``u, v = factorize(...)`` —
    with ``choice``, what the method selected for the layer (SVD-LLM: β), None when it selects nothing."""

    choice: Any

    def __new__(cls, u: torch.Tensor, v: torch.Tensor, choice: Any = None):
        pair = super().__new__(cls, (u, v))
        pair.choice = choice
        return pair


class Correction(NamedTuple):
    """What `CompressionMethod.dense_correction` returns: the refitted weight (None: leave the layer as it is) and
    what the method selected for the layer (None when it selects nothing)."""

    weight: torch.Tensor | None
    choice: Any = None


class CompressionMethod:
    name: ClassVar[str]
    #: "lowrank" or "quant": which module family the method fills.
    family: ClassVar[str]
    #: statistics the method needs: subset of {"gram", "absmean", "cross", "fisher"}; empty = data-free
    needs: ClassVar[frozenset[str]] = frozenset()
    #: whether part of the calibration data is held out for the method's own model selection
    needs_heldout: ClassVar[bool] = False
    #: rank allocation used when the config does not name one (each method's best)
    default_alloc: ClassVar[str] = "uniform"

    def __init__(self, **kwargs: Any):
        if kwargs:
            from ..errors import ConfigError

            raise ConfigError(f"method {self.name!r} takes no option(s) {sorted(kwargs)}")

    @property
    def requires_calibration(self) -> bool:
        return bool(self.needs)

    #: whether layers the plan keeps dense are still refitted to the dense model's outputs (`dense_correction`)
    corrects_dense: bool = False

    def dense_correction(self, weight: torch.Tensor, stats: Any, heldout: Any = None) -> Correction:
        """Refit a layer that stays dense (same shape, no parameter cost), given its input statistics on the
        compressed stream (``stats``; ``heldout``: those of the held-out windows). Called by the sequential
        pipeline for such layers when `corrects_dense` is true. Default: no change."""
        return Correction(None)

    def correct(self, weight: torch.Tensor, stats: Any, heldout: Any = None) -> torch.Tensor | None:
        """The refitted weight of `dense_correction`, or None."""
        return self.dense_correction(weight, stats, heldout).weight


class LowRankMethod(CompressionMethod):
    family = "lowrank"

    def spectrum(self, weight: torch.Tensor, stats: Any = None) -> torch.Tensor:
        """Singular values (descending) of the matrix this method truncates: Σ_{k>r} σ_k² is the error it pays
        at rank r, in the method's own metric. Used to allocate ranks."""
        raise NotImplementedError

    def spectra(self, stats: dict[str, Any], weight_of) -> dict[str, torch.Tensor]:
        """`spectrum` of several layers (one block's) at once: {name: singular values} for the names of
        ``stats``, ``weight_of(name)`` giving each dense fp32 weight when it is needed (one at a time). A method
        may share work between the layers here (SVD-LLM: one whitening per Gram that several layers read)."""
        return {n: self.spectrum(weight_of(n), st) for n, st in stats.items()}

    def spectrum_from_outputs(self, out_features: int, in_features: int) -> bool:
        """Whether the spectrum of a layer of this shape is taken from the Gram of its outputs
        (`LayerStats.out_gram`) instead of its inputs' statistics."""
        return False

    def factorize(self, weight: torch.Tensor, rank: int, stats: Any = None, heldout: Any = None) -> Factors:
        """Return (U [out, rank], V [rank, in]) with U @ V ≈ weight, as `Factors` (a plain pair is taken as one
        with no choice). ``weight`` is fp32, [out, in]."""
        raise NotImplementedError


class QuantMethod(CompressionMethod):
    family = "quant"

    def quantize(self, weight: torch.Tensor, bits: int, group_size: int, stats: Any = None,
                 scale_dtype: torch.dtype = torch.float16):
        """Return a `hf_compress.methods.quantlib.Quantized` (codes, scales, zeros) for ``weight`` (fp32, [out, in]),
        grouped along the input dimension; ``stats`` holds the layer's input statistics for calibrated methods."""
        raise NotImplementedError
