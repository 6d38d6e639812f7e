"""Exceptions. Each names the thing that is wrong; all are `ValueError`s so callers can catch them broadly."""


class HfCompressError(ValueError):
    """Base class of hf-compress errors."""


class ConfigError(HfCompressError):
    """A compression config or argument is invalid (ratio, rank, patterns, method...)."""


class UnsupportedModuleError(ConfigError):
    """A targeted module is of a type hf-compress cannot compress."""


class CheckpointError(HfCompressError):
    """A checkpoint on disk is missing, truncated, corrupt, or contradicts its config."""


class NonFiniteWeightError(HfCompressError):
    """A weight to compress holds NaN or Inf."""


class ExportError(HfCompressError):
    """A model cannot be exported (exactly) to the requested format; names the layers and why."""
