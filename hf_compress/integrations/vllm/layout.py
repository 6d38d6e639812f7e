"""How each hf-compress module's tensors lie along a linear layer's two axes, and how they shard (torch only).

A vLLM linear layer serving hf-compress weights holds one *part* module per logical weight (three for ``qkv_proj``,
two for ``gate_up_proj``, one otherwise): the hf-compress module its config record names, or an `nn.Linear` for a
part the compression left dense. Parts are built on the meta device at their full (unsharded) size; each checkpoint
tensor is checked against that shape, cut to this rank's slice and put in place, so a tensor still on the meta
device after loading is one the checkpoint lacked.

Tensor parallelism shards the way vLLM shards LoRA and its own WNA16 layers:

* column-parallel (``out`` split): U rows, codes / scales / zeros rows, packed Uᵀ codes along ``out``; V replicated;
* row-parallel (``in`` split): V columns, codes along ``in`` (unpacked, cut, repacked), scales / zeros by whole
  groups; U replicated — the all-reduce then sums U·(V_i·x_i) over the ranks, which is U·V·x.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ...kernels import pack, unpack
from ...modules import MODULE_TYPES, LowRankLinear, QuantLinear, QuantLowRankLinear

PLAIN, PACKED, GROUPED = "plain", "packed", "grouped"


class Spec(NamedTuple):
    """Where an axis lies in a tensor: dimension ``dim``, stored ``plain``, ``packed`` (``n`` = bits, codes along
    dim 1) or ``grouped`` (``n`` = group size: one entry per group along dim 1)."""

    dim: int
    unit: str = PLAIN
    n: int = 0


class Range(NamedTuple):
    """This rank's slice [start, start + size) of an axis of length ``total``."""

    start: int
    size: int
    total: int


def tensor_layout(module: nn.Module) -> dict[str, dict[str, Spec]]:
    """Tensor name -> {axis ("out" / "in"): `Spec`} for each axis the tensor spans (replicated along the others)."""
    if isinstance(module, nn.Linear):
        return {"weight": {"out": Spec(0), "in": Spec(1)}}
    if isinstance(module, LowRankLinear):
        return {"U": {"out": Spec(0)}, "V": {"in": Spec(1)}}
    if isinstance(module, QuantLowRankLinear):  # the rank axis between down and up is never split
        down = {f"down.{k}": {"in": v["in"]} for k, v in tensor_layout(module.down).items()}
        up = {f"up.{k}": {"out": v["out"]} for k, v in tensor_layout(module.up).items()}
        return {**down, **up}
    if isinstance(module, QuantLinear):
        groups = {"out": Spec(0), "in": Spec(1, GROUPED, module.group_size)}
        layout = {"qweight": {"out": Spec(0), "in": Spec(1, PACKED, module.bits)}, "scales": groups, "zeros": groups}
        if module.factor_bits:  # Uᵀ [r, out] and V [r, in], packed and grouped along their long side
            for factor, axis in (("U", "out"), ("V", "in")):
                layout[f"{factor}_qweight"] = {axis: Spec(1, PACKED, module.factor_bits)}
                layout[f"{factor}_scales"] = layout[f"{factor}_zeros"] = {axis: Spec(1, GROUPED, module.factor_group_size)}
        elif module.rank:
            layout.update(U={"out": Spec(0)}, V={"in": Spec(1)})
        return layout
    raise TypeError(f"no tensor layout for {type(module).__name__}")


def shard_tensor(t: torch.Tensor, spec: Spec, r: Range) -> torch.Tensor:
    """The slice ``r`` of tensor ``t`` along the axis ``spec`` describes."""
    if r.size == r.total:
        return t
    end = r.start + r.size
    if spec.unit == PACKED:
        return pack(unpack(t, spec.n, r.total)[:, r.start:end], spec.n)
    if spec.unit == GROUPED:
        g = spec.n
        if r.start % g or (end % g and end != r.total):
            raise ValueError(f"its group size {g} does not divide the tensor-parallel shard [{r.start}, {end}) of "
                             f"{r.total}: shard boundaries must fall on group boundaries")
        return t[:, r.start // g: -(-end // g)]
    return t.narrow(spec.dim, r.start, r.size)


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by dotted name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def part_module(record: dict | None, in_features: int, out_features: int, dtype: torch.dtype) -> nn.Module:
    """One part at full size on the meta device, bias-free (vLLM's layer owns the bias): the hf-compress module its
    config ``record`` describes, or an `nn.Linear` for a part left dense (``record`` None). ValueError if the record
    cannot be served."""
    if record is None:
        return nn.Linear(in_features, out_features, bias=False, device="meta", dtype=dtype)
    kind = record.get("type")
    if kind not in MODULE_TYPES:
        raise ValueError(f"unknown compressed module type {kind!r} (newer hf-compress?)")
    if record.get("source", "linear") != "linear":
        raise ValueError(f"it replaced a {record['source']!r} layer; the vLLM plugin serves layers that were "
                         "nn.Linear")
    return MODULE_TYPES[kind].from_record({**record, "bias": False}, in_features, out_features, device="meta",
                                          dtype=dtype)


def load_tensor(module: nn.Module, name: str, value: torch.Tensor, ranges: dict[str, Range]) -> None:
    """Put this rank's slice of the full checkpoint tensor ``value`` in place as ``module``'s tensor ``name``."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    current = getattr(owner, attr)
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f"tensor {name} has shape {tuple(value.shape)}, the config record implies "
                         f"{tuple(current.shape)}")
    for axis, spec in tensor_layout(module).get(name, {}).items():
        value = shard_tensor(value, spec, ranges[axis])
    value = value.to(dtype=current.dtype).contiguous()
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def set_shape(module: nn.Module, in_features: int, out_features: int) -> None:
    """Record the sharded sizes the loaded tensors now have (the forward reads ``in_features``)."""
    module.in_features, module.out_features = in_features, out_features
    if isinstance(module, QuantLowRankLinear):
        module.down.in_features, module.up.out_features = in_features, out_features


def part_ranges(parallel: str, tp_rank: int, in_features: int, in_per_rank: int, outs: list[int],
                outs_per_rank: list[int], kv_replicas: int = 1) -> list[dict[str, Range]]:
    """Per part, this rank's `Range` along ``in`` and ``out``. ``parallel`` is "column", "row" or "replicated";
    ``outs`` are the parts' full output sizes; for ``qkv_proj`` the k / v parts (index >= 1) are shared by
    ``kv_replicas`` ranks when there are fewer KV heads than ranks."""
    ranges = []
    for i, (out, per_rank) in enumerate(zip(outs, outs_per_rank)):
        if parallel == "column":
            shard = tp_rank // kv_replicas if i else tp_rank
            ranges.append({"in": Range(0, in_features, in_features), "out": Range(shard * per_rank, per_rank, out)})
        elif parallel == "row":
            ranges.append({"in": Range(tp_rank * in_per_rank, in_per_rank, in_features), "out": Range(0, out, out)})
        else:
            ranges.append({"in": Range(0, in_features, in_features), "out": Range(0, out, out)})
    return ranges
