"""The interface every compression method implements.

A method turns one dense weight (and, for calibrated methods, the statistics of that layer's inputs) into the
factors/codes of a compressed module; it never touches the model. The driver (`hf_compress.compressor`) finds
the targets, gathers statistics block by block (`hf_compress.calibration`), asks the allocator for a budget per
layer (`hf_compress.allocation`), calls the method, and swaps modules.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


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

    def factorize(self, weight: torch.Tensor, rank: int, stats: Any = None, heldout: Any = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (U [out, rank], V [rank, in]) with U @ V ≈ weight. ``weight`` is fp32, [out, in]."""
        raise NotImplementedError


class QuantMethod(CompressionMethod):
    family = "quant"

    def quantize(self, weight: torch.Tensor, bits: int, group_size: int, stats: Any = None,
                 scale_dtype: torch.dtype = torch.float16):
        """Return a `hf_compress.methods.quantlib.Quantized` (codes, scales, zeros) for ``weight`` (fp32, [out, in]),
        grouped along the input dimension; ``stats`` holds the layer's input statistics for calibrated methods."""
        raise NotImplementedError
