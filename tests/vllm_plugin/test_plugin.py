"""The vLLM plugin: checkpoints of every layer type load in vLLM with no flag, greedy tokens agree with transformers'
(fp32, all 32 new tokens of both prompts: exact agreement, the first divergence reported otherwise); merged layers
equal their separate parts; tensor-parallel shards recombine to the unsharded layer; bad checkpoints fail by name."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from vllm_helpers import (
    NEW_TOKENS,
    PROMPTS,
    assert_agrees,
    assert_same_tokens,
    compressed,
    hf_greedy,
    mixed_model,
    save,
    vllm_run,
)

from hf_compress import LowRankLinear, QuantLinear, QuantLowRankLinear
from hf_compress.integrations.vllm.layout import load_tensor, part_module, part_ranges, set_shape, tensors

ATOL = 1e-5  # fp32 layer outputs: the plugin runs the same modules, only the order of the sums changes

#: checkpoints served in one vLLM process (name -> how it is made)
CHECKPOINTS = {
    "llama-rtn4": lambda p: compressed("llama", {"method": "rtn", "bits": 4, "group_size": 32}, p),
    "llama-svd0.4": lambda p: compressed("llama", {"method": "svd", "ratio": 0.4}, p),
    "llama-mixed": lambda p: save(mixed_model("llama"), p),
    "qwen2-mixed": lambda p: save(mixed_model("qwen2"), p),
    "qwen2-gptq4": lambda p: compressed("qwen2", {"method": "gptq", "bits": 4, "group_size": 32,
                                                       "calibration": {"nsamples": 8, "seqlen": 32}}, p, calibrated=True),
    "llama-rtn4-kv": lambda p: compressed("llama", {"method": "rtn", "bits": 4, "group_size": 32, "kv": "quant4"}, p),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(paths, vLLM process) for all CHECKPOINTS, served one after another in one vLLM process."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {name: make(root / name) for name, make in CHECKPOINTS.items()}
    proc = vllm_run(list(paths.values()))
    assert proc.returncode == 0, proc.stderr[-6000:]
    return paths, proc


def test_entry_point_registers_plugin():
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.plugins import load_general_plugins
    from vllm.transformers_utils.config import get_config_parser

    from hf_compress.integrations.vllm.plugin import HfCompressConfig, HfCompressConfigParser

    load_general_plugins()
    assert get_quantization_config("hf_compress") is HfCompressConfig
    assert type(get_config_parser("hf")) is HfCompressConfigParser


def test_config_parser_unwraps_native_config(tmp_path):
    from hf_compress.integrations.vllm.plugin import HfCompressConfigParser

    path = compressed("qwen2", {"method": "svd", "ratio": 0.4}, tmp_path / "c")
    config_dict, config = HfCompressConfigParser().parse(path, trust_remote_code=False)
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    assert config_dict["quantization_config"]["quant_method"] == "hf_compress"
    assert config.quantization_config["modules"] == config_dict["quantization_config"]["modules"]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_tokens_agree_with_transformers(served, name):
    paths, proc = served
    assert_same_tokens(proc.result[str(paths[name])], hf_greedy(paths[name]), name)


def test_kv_spec_ignored_with_one_log_line(served):
    paths, proc = served
    lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines()
             if "ignoring the checkpoint's KV-cache spec" in line]
    assert lines and all("'method': 'quant'" in line for line in lines), lines
    pids = [re.search(r"pid=(\d+)", line).group(1) for line in lines]
    assert len(set(pids)) == len(pids), lines  # one line per vLLM process that reads the config
    # same weights as llama-rtn4 (deterministic RTN of the same model): the KV spec changes nothing in vLLM
    assert proc.result[str(paths["llama-rtn4-kv"])] == proc.result[str(paths["llama-rtn4"])]


# --- merged layers and tensor parallelism, on the layer modules themselves -------------------------------------------


@pytest.fixture(scope="module")
def mixed():
    return mixed_model("llama")


class FakeLayer(nn.Module):
    """What `HfCompressLinearMethod` reads of a vLLM linear layer (a replicated one: no process group needed)."""

    tp_rank, tp_size = 0, 1


def load_into_method(prefix: str, parts: list[tuple[str, nn.Module]], shard_ids, dtype=torch.float32):
    from hf_compress.integrations.vllm.plugin import HfCompressLinearMethod

    records = [(name, None if isinstance(m, nn.Linear) else m.record()) for name, m in parts]
    method = HfCompressLinearMethod(prefix, records)
    layer = FakeLayer()
    in_f = parts[0][1].in_features
    outs = [m.out_features for _, m in parts]
    method.create_weights(layer, in_f, outs, in_f, sum(outs), dtype)
    for (_, module), shard_id in zip(parts, shard_ids):
        for tensor_name, t in module.state_dict().items():
            proxy = layer.get_parameter(tensor_name)
            proxy.weight_loader(proxy, t, shard_id) if shard_id is not None else proxy.weight_loader(proxy, t)
    method.process_weights_after_loading(layer)
    return method, layer


@pytest.mark.parametrize("layer,proj,shard_ids,plan", [
    (0, "self_attn", ("q", "k", "v"), None),  # low rank r24 / dense / low rank r8: the parts' own forward
    (0, "mlp", (0, 1), None),  # 3-bit + float EoRA / 8-bit + packed EoRA (int4 layouts differ: 8-bit is two halves)
    (1, "self_attn", ("q", "k", "v"), "int4"),  # three 4-bit parts: one int4 kernel call
    (1, "mlp", (0, 1), "lowrank"),  # low rank r16 / r40: V stacked, one GEMM
])
def test_merged_layer_equals_separate_layers(mixed, layer, proj, shard_ids, plan):
    names = ["q_proj", "k_proj", "v_proj"] if proj == "self_attn" else ["gate_proj", "up_proj"]
    base = f"model.layers.{layer}.{proj}."
    parts = [(base + n, mixed.get_submodule(base + n)) for n in names]
    merged = base + ("qkv_proj" if proj == "self_attn" else "gate_up_proj")
    _check_merged(merged, parts, shard_ids, plan)


def _check_merged(merged, parts, shard_ids, plan):
    method, fake = load_into_method(merged, parts, shard_ids)
    assert (fake.hfc_int4 is not None, fake.hfc_lowrank is not None) == (plan == "int4", plan == "lowrank")
    x = torch.randn(5, parts[0][1].in_features, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(sum(m.out_features for _, m in parts), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.cat([m(x) for _, m in parts], dim=-1) + bias
        got = method.apply(fake, x, bias)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("config", [
    {"method": "hqq", "bits": 3, "group_size": 32, "eora_rank": 8},  # float EoRA: U block-diagonal, V stacked
    {"method": "rtn", "bits": 4, "group_size": 32, "eora_rank": 4, "eora_factor_bits": 4,
     "eora_factor_group_size": 32},  # packed EoRA, dequantized once at load
    {"method": "rtn", "bits": 2, "group_size": 64},
])
def test_quant_layers_run_as_one_int4_call(config):
    """Every part a QuantLinear of one int4 layout (single layers too): repacked at load, one kernel call (codes side by side) plus one low-rank term for
    the EoRA factors, equal to the separate layers (same bf16 kernel per output column; fp32 sums reordered)."""
    from vllm_helpers import _variant

    model = _variant("llama", config)
    for proj, names, shard_ids in [("self_attn", ["q_proj", "k_proj", "v_proj"], ("q", "k", "v")),
                                   ("mlp", ["gate_proj", "up_proj"], (0, 1)), ("self_attn", ["o_proj"], [None])]:
        base = f"model.layers.0.{proj}."
        parts = [(base + n, model.get_submodule(base + n)) for n in names]
        _check_merged(base + ("merged" if len(names) > 1 else names[0]), parts, shard_ids, "int4")


def test_single_layers_take_the_fast_paths(mixed):
    for name, plan in [("model.layers.0.self_attn.o_proj", None),  # 2-bit g48: no int4 kernel group divides 48
                       ("model.layers.1.self_attn.o_proj", "lowrank"), ("model.layers.0.mlp.down_proj", None)]:
        _check_merged(name, [(name, mixed.get_submodule(name))], [None], plan)


def shard(module: nn.Module, parallel: str, rank: int, tp: int) -> nn.Module:
    """This rank's part module of ``module``, loaded the way the plugin loads it."""
    record = None if isinstance(module, nn.Linear) else module.record()
    in_f, out_f = module.in_features, module.out_features
    in_rank = in_f // tp if parallel == "row" else in_f
    out_rank = out_f // tp if parallel == "column" else out_f
    (ranges,) = part_ranges(parallel, rank, in_f, in_rank, [out_f], [out_rank])
    part = part_module(record, in_f, out_f, torch.float32)
    for name, t in module.state_dict().items():
        if name != "bias":
            load_tensor(part, name, t, ranges)
    assert not any(t.is_meta for t in tensors(part).values())
    set_shape(part, in_rank, out_rank)
    return part


SHARDABLE = {  # name in the mixed model -> what it is
    "model.layers.0.self_attn.q_proj": LowRankLinear,
    "model.layers.0.self_attn.k_proj": nn.Linear,
    "model.layers.0.mlp.gate_proj": QuantLinear,  # 3-bit (codes straddle words) + float EoRA
    "model.layers.0.mlp.up_proj": QuantLinear,  # 8-bit + packed EoRA
    "model.layers.0.mlp.down_proj": QuantLowRankLinear,
    "model.layers.1.self_attn.q_proj": QuantLinear,  # 4-bit
}


@pytest.fixture
def reference_kernels(monkeypatch):
    """The fp32 torch reference for in-process forwards (HF_COMPRESS_KERNELS=torch), restored afterwards."""
    from hf_compress.kernels.dispatch import refresh_backend

    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    refresh_backend()
    yield
    monkeypatch.undo()
    refresh_backend()


@pytest.mark.parametrize("name", list(SHARDABLE))
@pytest.mark.parametrize("parallel", ["column", "row"])
def test_tensor_parallel_shards_recombine(mixed, name, parallel, reference_kernels):
    """tp=2: column shards concatenate to the unsharded output, row shards (on their input slices) sum to it —
    what vLLM's gather / all-reduce do. Checked on the fp32 torch reference (HF_COMPRESS_KERNELS=torch): the CPU
    int4 path computes in bf16, whose rounding differs between a sum of shards and the whole."""
    module = mixed.get_submodule(name)
    assert type(module) is SHARDABLE[name]
    tp = 2
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module(x)
        shards = [shard(module, parallel, r, tp) for r in range(tp)]
        if parallel == "column":
            got = torch.cat([s(x) for s in shards], dim=-1)
        else:
            got = sum(s(xs) for s, xs in zip(shards, x.chunk(tp, dim=-1)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=ATOL)


def test_row_shard_refuses_groups_across_ranks(mixed):
    """2-bit g48 o_proj (128 inputs): a tp=2 row shard of 64 columns would cut a group in two."""
    with pytest.raises(ValueError, match="group size 48 does not divide the tensor-parallel shard"):
        shard(mixed.get_submodule("model.layers.0.self_attn.o_proj"), "row", 1, 2)


# --- checkpoints the plugin cannot serve fail at load, naming the layer ---------------------------------------------


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config["base_config"]["quantization_config"]["modules"])
    (path / "config.json").write_text(json.dumps(config))


def test_unservable_checkpoints_fail_naming_the_layer(tmp_path):
    lm_head = compressed("llama", {"method": "rtn", "bits": 4, "group_size": 32}, tmp_path / "lm_head")
    _edit_config(lm_head, lambda modules: modules.update({"lm_head": dict(modules["model.layers.0.mlp.up_proj"])}))
    proc = vllm_run([lm_head])
    assert proc.returncode != 0
    assert "lm_head is compressed (quant), but vLLM builds it as a ParallelLMHead" in proc.stdout + proc.stderr

    missing = compressed("llama", {"method": "rtn", "bits": 4, "group_size": 32}, tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.scales"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    proc = vllm_run([missing])
    assert proc.returncode != 0
    assert "Checkpoint lacks tensor model.layers.1.mlp.down_proj.scales recorded in its config" in proc.stdout + proc.stderr


# --- tensor parallelism in vLLM's CPU backend ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 binds one core per rank")
def test_tensor_parallel_2_in_vllm_cpu(tmp_path, monkeypatch):
    """vLLM's CPU backend at ``tensor_parallel_size=2`` (two worker processes; its automatic thread binding wants one
    NUMA node per rank, so each rank is bound to one core by hand): column- and row-parallel shards of 4-bit and
    low-rank layers serve what transformers computes unsharded. Row-parallel int4 shards sum bf16-rounded partial
    products, so agreement is `assert_agrees`' (tokens, or logprobs within 0.25 nats)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    paths = [compressed("llama", {"method": "rtn", "bits": 4, "group_size": 32}, tmp_path / "rtn4"),
             compressed("llama", {"method": "svd", "ratio": 0.4}, tmp_path / "svd0.4")]
    proc = vllm_run(paths, tensor_parallel_size=2)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for path in paths:
        at = assert_agrees(path, PROMPTS, proc.result[str(path)], proc.result["logprobs:" + str(path)], 0.25,
                           f"tp=2 {path.name}")
        print(f"tp=2 {path.name}: greedy tokens agreeing per prompt {[NEW_TOKENS if a is None else a for a in at]}")
