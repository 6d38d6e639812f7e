"""hf-compress: compress transformers models (low rank today; quantization and KV caches next) into
checkpoints that load with ``AutoModelForCausalLM.from_pretrained``.

``import hf_compress`` registers the checkpoint format with transformers' Auto classes and quantizer registry.
"""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, HfCompressError, NonFiniteWeightError, UnsupportedModuleError  # noqa: E402
from .config import CompressionConfig  # noqa: E402
from .methods import available_methods  # noqa: E402
from .modules import LowRankLinear  # noqa: E402
from . import quantizer as _quantizer  # noqa: E402,F401  (registers the quantizer)
from . import auto as _auto  # noqa: E402
from .compressor import compress  # noqa: E402
from .saving import save_pretrained  # noqa: E402
from .evaluation import perplexity  # noqa: E402

_auto.register()

__all__ = [
    "CompressionConfig",
    "compress",
    "save_pretrained",
    "perplexity",
    "available_methods",
    "LowRankLinear",
    "HfCompressError",
    "ConfigError",
    "CheckpointError",
    "UnsupportedModuleError",
    "NonFiniteWeightError",
]
