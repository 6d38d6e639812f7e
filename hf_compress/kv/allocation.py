"""Per-layer widths for the quantized KV cache from one budget (``avg_bits``): mixed precision across layers and
between keys and values, measured rather than guessed (in the spirit of KVTuner's layer-wise sensitivity).

Sensitivity of a *half* (the keys or the values of one layer): the mean KL divergence, over the last quarter of each
calibration window, between the next-token distributions read through the spec's uniform cache and through the
same cache with only that half one width lower (8 -> 4 -> 3 -> 2 bits). The windows' first three quarters are
prefilled once (their keys/values captured from a DynamicCache) and copied into a fresh quantized cache per
candidate; the last quarter then attends to the quantized prefix, exactly as decode does. Halves are then lowered
greedily, least KL per saved bit first, until the average width over all compressed halves is at most ``avg_bits``
(every half holds the same number of elements, so the average is a plain mean). Drops are assumed to add up: each is
measured alone.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..compat import cache_kwargs
from ..calibration import device_of
from ..errors import ConfigError
from .base import compressible_layers, head_geometry
from .registry import kv_method
from .widths import check_head_dim, layer_widths

logger = logging.getLogger(__name__)

LOWER = {8: 4, 4: 3, 3: 2}  # one width down


def _widths(model, spec) -> tuple[list[int], dict[str, list]]:
    """(compressed layer indices, the spec's widths {"k": [...], "v": [...]} per decoder layer, None elsewhere)."""
    layers = compressible_layers(model.config)
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    return layers, {h: [layer_widths(spec, i)[j] if i in layers else None for i in range(n)] for j, h in enumerate("kv")}


def _fill(cache, captured) -> None:
    for layer, (k, v) in zip(cache.layers, captured):
        layer.update(k, v)


@torch.no_grad()
def layer_sensitivity(model, spec, windows: torch.Tensor, batch_size: int = 8) -> dict[tuple[int, str], float]:
    """KL per (layer, "k"|"v") when that half alone drops to ``LOWER`` of its width (halves that cannot drop, or
    whose lower width does not pack into head_dim, are absent)."""
    _, head_dim = head_geometry(model.config.get_text_config(decoder=True))
    n, seqlen = windows.shape
    chunk = max(1, seqlen // 4)
    prefix = seqlen - chunk
    if prefix < spec["residual"] + spec["group_size"]:
        raise ConfigError(f"KV calibration windows of {seqlen} tokens quantize nothing: their first {prefix} tokens "
                          f"do not exceed the window ({spec['residual']}) plus one key group ({spec['group_size']}); "
                          "use longer calibration windows (calibration seqlen)")
    layers, base = _widths(model, spec)
    candidates = []
    for i in layers:
        for h in "kv":
            lower = LOWER.get(base[h][i])
            if lower is None:
                continue
            trial = {**base, h: [lower if j == i else b for j, b in enumerate(base[h])]}
            try:
                check_head_dim(head_dim, {**spec, "layer_bits": trial})
            except ConfigError:
                continue
            candidates.append(((i, h), trial))
    if not candidates:
        return {}

    def cache_for(layer_bits):
        # the plain quantized cache at these widths, whatever the spec's method (as for GEAR, which shares them)
        return kv_method({"method": "quant"}).make_cache(model, {**spec, "avg_bits": None, "layer_bits": layer_bits})

    device = device_of(model)
    kl = {key: 0.0 for key, _ in candidates}
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            dyn = DynamicCache(config=model.config)
            model(input_ids=batch[:, :prefix], **cache_kwargs(model, dyn), use_cache=True)
            captured = [(layer.keys, layer.values) for layer in dyn.layers]

            def logprobs(layer_bits):
                cache = cache_for(layer_bits)
                _fill(cache, captured)
                logits = model(input_ids=batch[:, prefix:], **cache_kwargs(model, cache), use_cache=True).logits
                return F.log_softmax(logits.double(), dim=-1)

            ref = logprobs(base)
            p_ref = ref.exp()
            for key, trial in candidates:
                kl[key] += float((p_ref * (ref - logprobs(trial))).sum(-1).mean()) * batch.shape[0] / n
    finally:
        model.train(was_training)
    return kl


def allocate_layer_bits(model, spec, windows: torch.Tensor | None, batch_size: int = 8,
                        sensitivity: dict | None = None) -> dict[str, list]:
    """``layer_bits`` {"k": [...], "v": [...]} whose mean width over the compressed halves is <= ``spec["avg_bits"]``,
    lowering the halves whose measured KL per saved bit is smallest (``sensitivity``: `layer_sensitivity`'s result
    for this spec, to allocate several budgets from one measurement)."""
    target = spec["avg_bits"]
    layers, bits = _widths(model, spec)
    if not layers:
        raise ConfigError("KV avg_bits: this model has no layer the quantized cache compresses")
    halves = 2 * len(layers)

    def mean_width():
        return sum(b for h in "kv" for b in bits[h] if b is not None) / halves

    if mean_width() <= target:
        return bits
    kl = sensitivity if sensitivity is not None else layer_sensitivity(model, spec, windows, batch_size)
    order = sorted(kl, key=lambda key: kl[key] / (bits[key[1]][key[0]] - LOWER[bits[key[1]][key[0]]]))
    for i, h in order:
        if mean_width() <= target + 1e-9:
            break
        bits[h][i] = LOWER[bits[h][i]]
    if mean_width() > target + 1e-9:
        raise ConfigError(f"KV avg_bits {target} cannot be met on this model: lowering every half that can drop one "
                          f"width (8->4, 4->3, 3->2; 3-bit codes need head_dim a multiple of 8) leaves a mean of "
                          f"{mean_width():.3f} bits; lower bits / value_bits instead")
    logger.info("KV widths from avg_bits %s: keys %s, values %s", target, bits["k"], bits["v"])
    return bits
