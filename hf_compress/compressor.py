"""`compress(model, config)`: compress a loaded transformers model in place."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import plan_ranks
from .config import CompressionConfig
from .errors import ConfigError, NonFiniteWeightError
from .methods import get_method
from .modules import LowRankLinear
from .targets import dense_weight, find_targets, set_module, shape_of, source_of

logger = logging.getLogger(__name__)


def compress(model: nn.Module, config: CompressionConfig | dict | str, *, progress: bool = True) -> nn.Module:
    """Compress ``model`` in place according to ``config`` and return it.

    The model keeps its class (``LlamaForCausalLM`` stays ``LlamaForCausalLM``); targeted layers become
    compressed modules, and the model is marked so that ``save_pretrained`` writes an hf-compress checkpoint.
    """
    from .quantizer import attach

    config = CompressionConfig.coerce(config)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ConfigError("This model is already compressed/quantized; load the dense model to compress it again.")
    compress_modules(model, config, progress=progress)
    attach(model, config)
    return model


def compress_modules(model: nn.Module, config: CompressionConfig, *, progress: bool = True) -> None:
    """Replace the targeted modules of ``model`` by compressed ones (no bookkeeping on the model)."""
    method_cls = get_method(config.method)
    if method_cls.requires_calibration:
        raise ConfigError(f"method {config.method!r} needs calibration data")
    method = method_cls(**config.method_kwargs)

    targets = find_targets(model, config.targets, config.skip)
    shapes = {name: shape_of(m) for name, m in targets.items()}
    plan = plan_ranks(shapes, config.ratio, config.rank, config.dense_fallback)

    for name in tqdm(list(targets), desc=f"hf-compress {config.method}", disable=not progress, unit="layer"):
        module, rank = targets[name], plan[name]
        if rank is None:
            logger.info("%s stays dense: rank would not save parameters", name)
            continue
        with torch.no_grad():
            weight = dense_weight(module)
            if not torch.isfinite(weight).all():
                raise NonFiniteWeightError(f"Weight of {name} contains NaN or Inf; refusing to compress it.")
            u, v = method.factorize(weight.detach().float(), rank)
        new = LowRankLinear.from_factors(u, v, module.bias, source=source_of(module),
                                         dtype=weight.dtype, device=weight.device)
        set_module(model, name, new)
