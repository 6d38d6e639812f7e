"""hf-compress: compress transformers models (low rank, quantization, KV caches) into checkpoints that load with
``AutoModelForCausalLM.from_pretrained`` and fine-tune with PEFT.

``import hf_compress`` registers the checkpoint format with transformers' Auto classes and quantizer registry.
"""

from .version import __version__
from .errors import (CheckpointError, ConfigError, ExportError, HfCompressError, NonFiniteWeightError,  # noqa: E402
                     UnsupportedModuleError)
from .config import CompressionConfig  # noqa: E402
from .methods import available_methods  # noqa: E402
from .modules import LowRankLinear, QuantLinear, QuantLowRankLinear  # noqa: E402
from . import quantizer as _quantizer  # noqa: E402,F401  (registers the quantizer)
from . import auto as _auto  # noqa: E402
from .compressor import compress  # noqa: E402
from .coverage import coverage_report  # noqa: E402
from .hub import save_pretrained  # noqa: E402
from .evaluation import perplexity  # noqa: E402

_auto.register()

from .integrations import peft as _peft  # noqa: E402

_peft.register()

__all__ = [
    "CompressionConfig",
    "compress",
    "coverage_report",
    "save_pretrained",
    "perplexity",
    "available_methods",
    "LowRankLinear",
    "QuantLinear",
    "QuantLowRankLinear",
    "HfCompressError",
    "ConfigError",
    "CheckpointError",
    "UnsupportedModuleError",
    "NonFiniteWeightError",
    "ExportError",
]
