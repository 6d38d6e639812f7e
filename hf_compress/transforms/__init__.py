"""Transforms of the dense model applied before any weight method, each in its own file and registered by name:
``rotation.py`` (``rotate``: fold RMSNorm weights, rotate the residual stream; the kinds of rotation are in
`hf_compress.registry.ROTATIONS`), with the orthogonal matrices it uses in ``hadamard.py``. A rotation leaves a
plain model of the same class that computes the same function; ``expert_pruning.py`` (``expert_prune``) leaves a
plain model of the same class with fewer experts per mixture-of-experts block; ``channel_scales.py``
(``channel_scales="awq"``) folds activation-aware scales into each block, which the sequential pipeline applies to a
block just before quantizing it (the scales are searched on that block's inputs)."""

from ..registry import ROTATIONS
from .rotation import decoder_layout, rotate_residual

__all__ = ["ROTATIONS", "decoder_layout", "rotate_residual"]
