"""Residual-stream rotation (incoherence processing, QuaRot / SpinQuant R1), folded into the weights.

For a Llama-architecture decoder (llama, qwen2, mistral), with Q an orthogonal matrix of the hidden size:

1. every RMSNorm's weight γ is folded into the linear layers that read the norm's output (q/k/v after
   ``input_layernorm``, gate/up after ``post_attention_layernorm``, the head after the final ``norm``): W ← W·diag(γ),
   and the norm's weight becomes 1 — exact, since RMSNorm(h)·γ feeds only those layers;
2. the residual stream h is replaced by Qᵀh: the embedding E ← E·Q, every layer that reads the stream
   (q/k/v/gate/up and the head) W ← W·Q, every layer that writes it (o_proj, down_proj) W ← Qᵀ·W, b ← Qᵀ·b. A
   weightless RMSNorm commutes with Q (‖Qᵀh‖ = ‖h‖), so the model computes the same function — in exact
   arithmetic; the folding is done in fp64 and rounded once to the model's dtype.

The model stays a plain model of its own class (no new module, no runtime op): it saves, loads, exports and serves
like the original. The rotated weights have no outlier input channels (a randomized Hadamard spreads each channel
evenly over all of them), which is what makes them easier to quantize. A head tied to the input embedding can not
stay tied (the head also absorbs the final norm's γ): it is untied, and the checkpoint then stores one more
vocabulary x hidden matrix (`untie`).

Q (`ROTATIONS`): ``"hadamard"``, a randomized Hadamard diag(s)·H/√n (`hadamard.randomized_hadamard`; when no
Hadamard of order n is constructed, a random orthogonal matrix instead, with a warning), or ``"orthogonal"``, a
Haar-random orthogonal matrix; both drawn from ``seed``, so a run is reproducible (and a resumed run rotates
identically).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, NonFiniteWeightError
from ..registry import ROTATIONS
from ..targets import is_offloaded, untie
from .hadamard import random_orthogonal, randomized_hadamard

logger = logging.getLogger(__name__)

#: model types whose decoder is the Llama layout with plain RMSNorms (x / rms(x) · γ) and an unscaled embedding
LLAMA_LIKE = ("llama", "qwen2", "mistral")
#: rows of the embedding / head rotated at a time (bounds the fp64 copy of a large vocabulary)
ROW_CHUNK = 8192


@ROTATIONS.register("hadamard")
class HadamardRotation:
    """A randomized Hadamard matrix diag(s)·H/√n; a random orthogonal one where no Hadamard of order n is built."""

    @staticmethod
    def matrix(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        q = randomized_hadamard(n, generator)
        if q is not None:
            return q, f"randomized Hadamard of order {n}"
        logger.warning("rotate='hadamard': no Hadamard matrix of order %d is constructed (it needs n = 1, 2 or a multiple "
                       "of 4 reachable by Sylvester/Paley constructions); using a random orthogonal matrix instead", n)
        return random_orthogonal(n, generator), f"random orthogonal of order {n} (no Hadamard of that order)"


@ROTATIONS.register("orthogonal")
class OrthogonalRotation:
    """A Haar-random orthogonal matrix."""

    @staticmethod
    def matrix(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        return random_orthogonal(n, generator), f"random orthogonal of order {n}"


@dataclass
class DecoderLayer:
    input_norm: nn.Module
    post_attention_norm: nn.Module
    readers_attn: list[nn.Linear]  # q, k, v: read input_layernorm's output
    readers_mlp: list[nn.Linear]  # gate, up: read post_attention_layernorm's output
    writers: list[nn.Linear]  # o_proj, down_proj: add to the residual stream
    head_dim: int  # of the attention heads (v_proj's output rows and o_proj's input columns, head by head)


@dataclass
class DecoderLayout:
    """The modules a residual rotation changes."""

    embedding: nn.Embedding
    layers: list[DecoderLayer]
    final_norm: nn.Module
    head: nn.Linear
    hidden_size: int


def _is_rmsnorm(module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and getattr(module, "bias", None) is None)


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """The Llama layout of ``model``, or a `ConfigError` that names what is missing."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    missing: list[str] = []
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None:
        missing.append("a decoder (get_decoder())")
    emb = getattr(decoder, "embed_tokens", None)
    if not isinstance(emb, nn.Embedding):
        missing.append("an nn.Embedding embed_tokens")
    if not isinstance(head, nn.Linear):
        missing.append("an nn.Linear output head (lm_head): the final norm's weight is folded into it")
    if not _is_rmsnorm(getattr(decoder, "norm", None)):
        missing.append("a final RMSNorm `norm`")
    blocks = getattr(decoder, "layers", None)
    layers: list[DecoderLayer] = []
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        missing.append("a ModuleList of decoder `layers`")
        blocks = []
    for i, block in enumerate(blocks):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        parts = {f"self_attn.{p}": getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        parts.update({f"mlp.{p}": getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")})
        lacks = [p for p, m in parts.items() if type(m) is not nn.Linear]
        lacks += [f"an RMSNorm {n}" for n in ("input_layernorm", "post_attention_layernorm")
                  if not _is_rmsnorm(getattr(block, n, None))]
        if lacks:
            missing.append(f"layers.{i}: " + ", ".join(lacks))
            break  # one layer's report is enough
        layers.append(DecoderLayer(block.input_layernorm, block.post_attention_layernorm,
                                   [parts[f"self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")],
                                   [parts["mlp.gate_proj"], parts["mlp.up_proj"]],
                                   [parts["self_attn.o_proj"], parts["mlp.down_proj"]],
                                   int(getattr(attn, "head_dim", 0) or 0)))
    supported = ", ".join(LLAMA_LIKE)
    if missing:
        raise ConfigError(f"rotate folds RMSNorm weights and rotates the residual stream of Llama-architecture decoders "
                          f"({supported}); {name} (model_type {model_type!r}) lacks: " + "; ".join(missing)
                          + ". Compress it without rotate.")
    if model_type not in LLAMA_LIKE:
        raise ConfigError(f"rotate supports the model types {supported}; {name} has their module layout but model_type "
                          f"{model_type!r}, whose norms or embeddings may not be the plain RMSNorm x/rms(x)·γ and "
                          "unscaled lookup the folding assumes (e.g. Gemma's (1 + γ), a scaled embedding). Compress it "
                          "without rotate.")
    touched = [emb, head, decoder.norm] + [m for layer in layers for m in
                                           (layer.input_norm, layer.post_attention_norm, *layer.readers_attn,
                                            *layer.readers_mlp, *layer.writers)]
    if any(is_offloaded(m) for m in touched):
        raise ConfigError("rotate rewrites every layer that reads or writes the residual stream, and some of them are "
                          "offloaded (device_map with disk/cpu offload): load the model in memory to rotate it.")
    return DecoderLayout(emb, layers, decoder.norm, head, emb.weight.shape[1])


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _right(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """weight ← (weight · diag(scale)) · Q, in fp64, row chunk by row chunk."""
    q = q.to(weight.device)
    scale = None if scale is None else scale.to(weight.device, torch.float64)
    for start in range(0, weight.shape[0], ROW_CHUNK):
        rows = weight[start : start + ROW_CHUNK]
        w = rows.detach().double()
        if scale is not None:
            w = w * scale[None, :]
        _assign(rows, w @ q)


def _left(linear: nn.Linear, q: torch.Tensor) -> None:
    """W ← Qᵀ·W, b ← Qᵀ·b (a layer that writes the residual stream)."""
    q = q.to(linear.weight.device)
    _assign(linear.weight, q.T @ linear.weight.detach().double())
    if linear.bias is not None:
        _assign(linear.bias, q.T @ linear.bias.detach().double())


def _untie_head(model: nn.Module, layout: DecoderLayout) -> bool:
    """Give a head that shares the embedding's weight its own copy; the config says they are no longer tied."""
    if layout.head.weight is not layout.embedding.weight:
        return False
    layout.head.weight = nn.Parameter(layout.embedding.weight.detach().clone(),
                                      requires_grad=layout.embedding.weight.requires_grad)
    untie(model, "rotate: the output head absorbs the final norm's weight, so it can no longer share the input "
                 "embedding's: untied (tie_word_embeddings=False); the checkpoint stores both matrices")
    return True


def _rotate_heads(layer: DecoderLayer, q: torch.Tensor) -> None:
    """Each value head v ← Qᵀ·v (v_proj's rows, head by head) and each head's slice of o_proj's input W_o[:, h] ←
    W_o[:, h]·Q: attention mixes a head's value vectors linearly, so its output is Qᵀ·(the original's), which o_proj
    undoes — for grouped-query attention too (every query head reads rotated values of its kv head)."""
    v, o, d = layer.readers_attn[2], layer.writers[0], layer.head_dim
    q = q.to(v.weight.device)
    w = v.weight.detach().double()
    _assign(v.weight, (q.T @ w.view(-1, d, w.shape[1])).reshape_as(w))
    if v.bias is not None:
        _assign(v.bias, (v.bias.detach().double().view(-1, d) @ q).reshape(-1))
    w = o.weight.detach().double()
    _assign(o.weight, (w.view(w.shape[0], -1, d) @ q).reshape_as(w))


def rotate_residual(model: nn.Module, kind: str = "hadamard", seed: int = 0, heads: bool = False) -> dict:
    """Fold every RMSNorm weight into the layers that read it and rotate the residual stream of ``model`` (in place;
    the model computes the same function). ``heads``: also rotate every attention head's values by one orthogonal
    matrix of the head size, folded into v_proj and o_proj (SpinQuant's R2). Returns {"rotation": what Q is,
    "untied_head": bool}."""
    layout = decoder_layout(model)
    for name, p in model.named_parameters():  # refuse NaN/Inf before anything changes (it would spread everywhere)
        if p.numel() and not torch.isfinite(torch.stack(p.detach().aminmax())).all():
            raise NonFiniteWeightError(f"{name} contains NaN or Inf; refusing to rotate the model.")
    dims = {layer.head_dim for layer in layout.layers}
    if heads and (len(dims) != 1 or not all(d > 0 and layer.readers_attn[2].out_features % d == 0
                                            and layer.writers[0].in_features % d == 0
                                            for layer in layout.layers for d in dims)):
        raise ConfigError(f"rotate_heads needs one attention head size that divides v_proj's outputs and o_proj's "
                          f"inputs; {type(model).__name__} has head sizes {sorted(dims)}")
    generator = torch.Generator().manual_seed(int(seed))
    q, what = ROTATIONS.get(kind).matrix(layout.hidden_size, generator)
    untied = _untie_head(model, layout)
    _right(layout.embedding.weight, q)
    for layer in layout.layers:
        for norm, readers in ((layer.input_norm, layer.readers_attn), (layer.post_attention_norm, layer.readers_mlp)):
            gamma = norm.weight.detach().double()
            for linear in readers:
                _right(linear.weight, q, gamma)
            _assign(norm.weight, torch.ones_like(gamma))
        for linear in layer.writers:
            _left(linear, q)
    gamma = layout.final_norm.weight.detach().double()
    _right(layout.head.weight, q, gamma)
    _assign(layout.final_norm.weight, torch.ones_like(gamma))
    logger.info("rotate: RMSNorm weights folded, residual stream rotated by a %s (seed %d)", what, seed)
    if heads:
        q2, what2 = ROTATIONS.get(kind).matrix(layout.layers[0].head_dim, generator)
        for layer in layout.layers:
            _rotate_heads(layer, q2)
        what += f"; attention heads: {what2}"
        logger.info("rotate: attention heads rotated by a %s", what2)
    return {"rotation": what, "untied_head": untied}
