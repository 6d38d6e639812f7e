"""Named recipes: ``{"method": "best", "bits": 3, "group_size": 64}`` (CLI ``--method best``) stands for the combination
of options that measured best at the same bytes as plain ``bits``/``group_size`` (docs/quantization.md, "method
best", with the command that measured it).

A recipe fills in fields the caller left at their defaults and never overrides one the caller set; the config then
holds the concrete method and options it ran (``method`` is the real method, ``recipe`` records the name), so a
checkpoint says exactly what was done. Parts of a recipe that a model cannot take (the residual-stream rotation needs a
Llama-layout decoder; and it unties a head tied to the input embeddings, which would store one more embedding-sized
matrix than plain quantization does) are left out at `compress` time, with a log line naming the reason (`resolve`).
"""

from __future__ import annotations

import copy
import logging

from .errors import ConfigError

logger = logging.getLogger(__name__)

#: recipe name -> (the concrete method, the config fields it sets, the method options it sets)
RECIPES: dict[str, tuple[str, dict, dict]] = {
    # GPTQ (act_order) with the activation-aware grid search, on a residual stream rotated by a randomized Hadamard
    # (QuaRot / SpinQuant R1, folded into the weights: the checkpoint stays a plain model that every format exports)
    "best": ("gptq", {"rotate": "hadamard"}, {"grid": "mse-act"}),
}


def is_recipe(name) -> bool:
    return isinstance(name, str) and name in RECIPES


def expand(name: str, fields: dict, method_kwargs: dict) -> tuple[str, dict, dict, tuple[str, ...]]:
    """(method, fields, method_kwargs, the fields the recipe filled in) for recipe ``name``: the caller's explicit
    fields and method options win."""
    method, sets, options = RECIPES[name]
    if fields.get("bits") is None:
        raise ConfigError(f"method {name!r} is a quantization recipe: give bits (2, 3, 4 or 8) and group_size")
    if fields.get("ratio") is not None or fields.get("rank") is not None:
        raise ConfigError(f"method {name!r} quantizes; ratio/rank belong to low-rank methods")
    out, filled = dict(fields), []
    for key, value in sets.items():
        if out.get(key) is None:
            out[key] = value
            filled.append(key)
    return method, out, {**options, **method_kwargs}, tuple(filled)


def resolve(model, config):
    """The config a recipe run uses on ``model``: the recipe's rotation is dropped, with a log line that says why,
    where the model's layout cannot take it (a warning) or where its head is tied to the input embeddings (the
    rotation would untie it: more bytes than the plain ``bits``/``group_size`` the recipe promises to stay within).
    Returns ``config`` itself when nothing changes, else a copy."""
    if not getattr(config, "recipe", None) or not config.rotate or "rotate" not in config.recipe_filled:
        return config
    from .transforms import decoder_layout

    try:
        decoder_layout(model)
    except ConfigError as e:
        logger.warning("method %r: the residual-stream rotation is left out for %s (%s); the rest of the recipe "
                       "(%s, %s) runs", config.recipe, type(model).__name__, e, config.method, config.method_kwargs)
        return _without_rotation(config)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        logger.info("method %r: the residual-stream rotation is left out for %s: its head is tied to the input "
                    "embeddings, and rotating would untie it (%d more parameters stored than plain %d-bit "
                    "quantization); the rest of the recipe (%s, %s) runs. Pass rotate='hadamard' to rotate anyway.",
                    config.recipe, type(model).__name__, head.weight.numel(), config.bits, config.method,
                    config.method_kwargs)
        return _without_rotation(config)
    return config


def _without_rotation(config):
    resolved = copy.deepcopy(config)
    resolved.rotate, resolved.rotate_heads = None, False
    return resolved
