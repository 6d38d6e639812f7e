"""Mixture-of-experts models: experts are split into per-expert layers, compressed by every weight method, saved in the
model's own names and loaded back into the native class; calibrated methods see the routed tokens."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os

import pytest
import torch
from safetensors import safe_open
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_compress
from hf_compress.errors import UnsupportedModuleError
from hf_compress.modules import LowRankLinear, QuantLinear, QuantLowRankLinear, compressed_modules
from hf_compress.modules.experts import CompressedExperts, ExpertLinears, is_fused_experts, split_experts
from hf_compress.targets import find_targets, routers

from conftest import REPO, VOCAB

_COMMON = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: tiny random configs of the MoE architectures the issue names (8 experts, top-2)
MOE = {
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      head_dim=12),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=64),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=12, sliding_window=16),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=4),
    "granitemoe": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_next": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       head_dim=12, shared_expert_intermediate_size=32, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                       layer_types=["linear_attention", "full_attention"]),
}


def tiny_moe(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**_COMMON, **MOE[arch]})
    return AutoModelForCausalLM.from_config(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def experts_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedExperts) or is_fused_experts(m)}


def expert_parameter_count(model) -> int:
    return sum(p.numel() for m in experts_modules(model).values() for p in m.parameters())


def calibration_ids(n=8, seqlen=32):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(2))


def _moe_builder():
    spec = importlib.util.spec_from_file_location("moe_model", os.path.join(REPO, "benchmarks", "moe_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.moe_from_dense


# ----------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("arch", sorted(MOE))
def test_split_experts_compute_what_the_fused_module_computes(arch, ids):
    model = tiny_moe(arch)
    fused = experts_modules(model)
    assert fused and all(is_fused_experts(m) for m in fused.values())
    before = {n: {k: p.clone() for k, p in m.named_parameters()} for n, m in fused.items()}
    ref = logits(model, ids)
    names = split_experts(model)
    assert sorted(names) == sorted(fused)
    assert all(isinstance(model.get_submodule(n), CompressedExperts) for n in names)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    for n in names:  # and back, bit for bit, in the native class
        native = model.get_submodule(n).to_native()
        assert type(native) is type(fused[n])
        for k, p in native.named_parameters():
            assert torch.equal(p, before[n][k]), (n, k)


@pytest.mark.parametrize("arch", sorted(MOE))
def test_experts_compressed_by_default_routers_dense_and_reload_exact(arch, ids, tmp_path):
    model = tiny_moe(arch)
    n_expert_params = expert_parameter_count(model)
    router_weights = {n: p.clone() for n, p in model.named_parameters() if "gate.weight" in n or "router" in n}
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16}, progress=False)
    compressed = compressed_modules(model)
    experts = {n: m for n, m in experts_modules(model).items()}
    assert experts and all(isinstance(m, CompressedExperts) for m in experts.values())
    covered = 0
    for name, module in experts.items():
        for weight in module.weight_names:
            layers = getattr(module, weight)
            assert len(layers) == module.num_experts
            assert all(isinstance(layer, QuantLinear) for layer in layers)
            covered += sum(layer.in_features * layer.out_features + (layer.bias.numel() if layer.bias is not None
                                                                    else 0) for layer in layers)
    assert covered == n_expert_params  # every expert weight (and bias) is in a compressed layer
    for n, p in model.named_parameters():  # routers untouched
        if n in router_weights:
            assert torch.equal(p, router_weights[n]), n
    assert not any("router" in n or n.endswith(".gate") or n.endswith("shared_expert_gate") for n in compressed)
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    some_expert = next(n for n in compressed if ".experts." in n)
    assert f"{some_expert}.qweight" in keys  # the model's own names, not the original format's
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert all(isinstance(loaded.get_submodule(n), CompressedExperts) for n in experts)
    torch.testing.assert_close(logits(loaded, ids), out, rtol=0, atol=0)


def test_the_weight_conversions_transformers_reverts_on_save_are_ours_to_drop(tmp_path):
    """transformers records a model's load-time conversion mapping in ``model._weight_conversions`` and reverts it in
    ``save_pretrained`` (which would rename our per-expert tensors into the original format's fused layout);
    `hf_compress.quantizer.attach` empties it. This fails when transformers renames that internal."""
    from transformers.core_model_loading import revert_weight_conversion

    model = tiny_moe("mixtral")  # its mapping renames .mlp. to .block_sparse_moe. and merges w1/w3
    hf_compress.compress(model, {"method": "rtn", "bits": 8, "group_size": 16}, progress=False)
    assert model._weight_conversions == []
    sd = {k: v for k, v in model.state_dict().items() if "layers.0.mlp.experts.gate_up_proj.0" in k}
    assert set(revert_weight_conversion(model, dict(sd))) == set(sd)
    del model._weight_conversions  # without it transformers falls back to the architecture's mapping
    assert set(revert_weight_conversion(model, dict(sd))) != set(sd)


def test_unsplit_when_experts_are_skipped_and_on_error(ids):
    model = tiny_moe("qwen3_moe")
    fused_types = {n: type(m) for n, m in experts_modules(model).items()}
    ref = logits(model, ids)
    hf_compress.compress(model, {"method": "rtn", "bits": 8, "skip": ["experts"]}, progress=False)
    assert {n: type(m) for n, m in experts_modules(model).items()} == fused_types  # fused module back
    assert not any(".experts." in n for n in compressed_modules(model))
    model = tiny_moe("qwen3_moe")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
    with pytest.raises(hf_compress.errors.NonFiniteWeightError, match=r"experts\.down_proj\.3"):
        hf_compress.compress(model, {"method": "rtn", "bits": 4}, progress=False)
    assert {n: type(m) for n, m in experts_modules(model).items()} == fused_types  # nothing left split
    assert not compressed_modules(model)


def test_explicit_targets_name_experts_and_unsupported_modules_get_true_advice():
    model = tiny_moe("qwen3_moe")
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "targets": ["experts"]}, progress=False)
    names = list(compressed_modules(model))
    assert len(names) == 2 * 2 * 8 and all(".experts." in n for n in names)
    model = tiny_moe("qwen3_moe")
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "targets": ["experts.down_proj"]}, progress=False)
    assert all(".experts.down_proj." in n for n in compressed_modules(model)) and len(compressed_modules(model)) == 16
    model = tiny_moe("qwen3_moe")
    with pytest.raises(UnsupportedModuleError, match=r"self_attn.*'model\.layers\.0\.self_attn\.q_proj'"):
        hf_compress.compress(model, {"method": "rtn", "bits": 4, "targets": ["layers.0.self_attn"]}, progress=False)
    with pytest.raises(UnsupportedModuleError, match="holds no linear layer or experts weights"):
        hf_compress.compress(model, {"method": "rtn", "bits": 4, "targets": ["input_layernorm"]}, progress=False)


def test_routers_are_the_linear_siblings_of_experts():
    model = tiny_moe("qwen2_moe")  # gate: a router module; shared_expert_gate: nn.Linear [1, H]
    split_experts(model)
    assert routers(model) == {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)}
    default = find_targets(model, None, [])
    assert not set(default) & routers(model)
    assert {f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")} <= set(default)


@pytest.mark.parametrize("config", [
    {"method": "hqq", "bits": 3, "group_size": 16},
    {"method": "rtn", "bits": 4, "group_size": 16, "eora_rank": 4},
    {"method": "svd", "ratio": 0.3},
    {"method": "svd", "ratio": 0.3, "bits": 4, "group_size": 16},
])
def test_every_data_free_kind_of_layer_on_experts(config, ids, tmp_path):
    model = tiny_moe("gpt_oss")  # transposed experts with biases and its own clamped gate
    ref = logits(model, ids)
    hf_compress.compress(model, config, progress=False)
    kinds = {type(m) for n, m in compressed_modules(model).items() if ".experts." in n}
    assert kinds and kinds <= {QuantLinear, LowRankLinear, QuantLowRankLinear}
    out = logits(model, ids)
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.5 * ref.abs().max()
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), out, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("method,baseline", [("gptq", "rtn"), ("svd_llm", "svd"), ("asvd", "svd"), ("fwsvd", "svd")])
def test_calibrated_methods_on_experts(method, baseline):
    """Every calibrated method compresses every expert; GPTQ and SVD-LLM, which minimise the layer-output error
    on the calibration tokens, end closer to the dense model on them than their data-free counterparts."""
    cal = calibration_ids()
    dense = tiny_moe("qwen3_moe")
    ref = logits(dense, cal)
    errors = {}
    for name in (method, baseline):
        model = copy.deepcopy(dense)
        config = {"method": name, "calibration": {"nsamples": 8, "seqlen": 32}}
        config.update({"bits": 3, "group_size": 16} if method == "gptq" else {"ratio": 0.2, "alloc": "uniform"})
        hf_compress.compress(model, config, calibration=cal if name == method else None, progress=False)
        assert sum(".experts." in n for n in compressed_modules(model)) == 2 * 2 * 8
        out = logits(model, cal)
        assert torch.isfinite(out).all()
        errors[name] = float((out - ref).pow(2).mean())
    if method in ("gptq", "svd_llm"):
        assert errors[method] < errors[baseline], errors


def _routed_inputs(model, ids):
    """{expert layer name: number of tokens it receives} on ``ids`` (dense model, split experts)."""
    counts = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: counts.__setitem__(n, counts.get(n, 0) + args[0].shape[0]))
               for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".experts.gate_up_proj." in n]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return counts


def _never_route_to(router: nn.Module, expert: int) -> None:
    """Send the router's choices of ``expert`` to the next expert instead (a token may then use that one twice)."""
    def hook(module, args, out):
        logits_, weights, index = out
        return logits_, weights, torch.where(index == expert, (expert + 1) % logits_.shape[-1], index)
    router.register_forward_hook(hook)


def test_gptq_expert_hessians_are_of_routed_tokens_or_all_tokens(monkeypatch):
    """The statistics each expert's layer is fitted on: routed tokens only by default, every token with
    experts="all", and one white input (Gram I: round to nearest) for an expert no token reaches."""
    from hf_compress.pipelines import sequential

    seen = {}
    original = sequential.replace

    def spy(model, target, method, config, rank, stats=None, heldout=None):
        seen[target.name] = (stats.count, bool(torch.equal(stats.gram, torch.eye(stats.gram.shape[0],
                                                                                  dtype=stats.gram.dtype))))
        return original(model, target, method, config, rank, stats, heldout)

    monkeypatch.setattr(sequential, "replace", spy)
    cal = calibration_ids(4, 16)
    prefix = "model.layers.0.mlp.experts.gate_up_proj"
    for rule in ("routed", "all"):
        seen.clear()
        model = tiny_moe("qwen3_moe")
        _never_route_to(model.model.layers[0].mlp.gate, 5)
        config = {"method": "gptq", "bits": 4, "group_size": 16, "targets": ["layers.0.mlp.experts.gate_up_proj"],
                  "calibration": {"nsamples": 4, "seqlen": 16, "batch_size": 4, "experts": rule}}
        hf_compress.compress(model, config, calibration=cal, progress=False)
        counts = [seen[f"{prefix}.{e}"][0] for e in range(8)]
        whites = [seen[f"{prefix}.{e}"][1] for e in range(8)]
        if rule == "all":
            assert counts == [cal.numel()] * 8 and not any(whites)
        else:
            assert counts[5] == 1 and whites[5]  # the white fallback
            assert sum(counts) - 1 == cal.numel() * 2  # top-2: each token reaches two experts (or one twice)
            assert not any(w for e, w in enumerate(whites) if e != 5)


def test_svd_llm_experts_have_no_held_out_statistics_of_their_own(monkeypatch):
    """SVD-LLM holds 1 in 8 calibration windows out to choose each dense layer's compensation strength from its
    cross terms. Experts have no cross terms, so they are fitted on every window with no held-out statistics (one
    Gram per expert, not two): an expert's token count is its share of all windows; attention layers keep both."""
    from hf_compress.pipelines import sequential

    seen = {}
    original = sequential.replace

    def spy(model, target, method, config, rank, stats=None, heldout=None):
        seen[target.name] = (stats.count, None if heldout is None else heldout.count)
        return original(model, target, method, config, rank, stats, heldout)

    monkeypatch.setattr(sequential, "replace", spy)
    cal = calibration_ids(8, 16)
    model = tiny_moe("qwen3_moe")
    config = {"method": "svd_llm", "ratio": 0.5, "alloc": "uniform",
              "calibration": {"nsamples": 8, "seqlen": 16, "batch_size": 1}}
    hf_compress.compress(model, config, calibration=cal, progress=False)
    for block in (0, 1):
        experts = [v for n, v in seen.items() if n.startswith(f"model.layers.{block}.mlp.experts.gate_up_proj.")]
        assert len(experts) == 8 and all(held is None for _, held in experts)
        assert sum(count for count, _ in experts) == cal.numel() * 2  # top-2 over all 8 windows
        train, held = seen[f"model.layers.{block}.self_attn.o_proj"]
        assert (train, held) == (7 * 16, 16)  # 7 training windows, 1 held out


def test_fallback_is_logged(caplog):
    model = tiny_moe("qwen3_moe")
    _never_route_to(model.model.layers[0].mlp.gate, 5)
    config = {"method": "gptq", "bits": 4, "group_size": 16, "calibration": {"nsamples": 4, "seqlen": 16}}
    with caplog.at_level(logging.WARNING):
        hf_compress.compress(model, config, calibration=calibration_ids(4, 16), progress=False)
    assert any("received no calibration token" in r.message and "experts.gate_up_proj.5" in r.message
               for r in caplog.records)


def test_a_groups_statistics_are_released_before_the_next_groups_are_gathered(monkeypatch):
    """Memory bound of a MoE block (moe_scale.py's formula): one group's Grams at a time. When the pipeline gathers
    a group's statistics, no Gram of an earlier group of the block is still alive (each is released once its layer
    is fitted); the experts' gate/up Grams are gone before the down group's are gathered."""
    import weakref

    from hf_compress.pipelines import sequential

    model = tiny_moe("qwen3_moe")
    gathered: list[tuple[list[str], list]] = []
    real = sequential.collect

    def collect(runner, i, block, layers, *args, **kwargs):
        for names, refs in gathered:
            alive = [n for n, r in zip(names, refs) if r() is not None]
            assert not alive, f"statistics of {alive} still alive while gathering {list(layers)[:2]}"
        stats = real(runner, i, block, layers, *args, **kwargs)
        names = [n for n, (train, _) in stats.items() if train.gram is not None]
        gathered.append((names, [weakref.ref(stats[n][0].gram) for n in names]))
        return stats

    monkeypatch.setattr(sequential, "collect", collect)
    config = {"method": "gptq", "bits": 4, "group_size": 16, "calibration": {"nsamples": 4, "seqlen": 16}}
    hf_compress.compress(model, config, calibration=calibration_ids(4, 16), progress=False)
    groups = [names for names, _ in gathered]
    assert any(all(".experts.gate_up_proj." in n for n in g) and len(g) == 8 for g in groups), groups
    assert any(all(".experts.down_proj." in n for n in g) and len(g) == 8 for g in groups), groups


# ----------------------------------------------------------------------------------------------- exactness
def _dense_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2)).eval()


def test_moe_built_from_a_dense_model_computes_and_compresses_like_it(ids):
    """benchmarks/moe_model.py's exact construction (4 experts, top-4, zero router, down x 4): the dense model's
    function; RTN's logits equal dense RTN's (groups of 16 align with the 32-neuron experts; x4 is exact in fp16);
    GPTQ's first-block gate/up experts are dense GPTQ's rows (same Hessian, rows independent)."""
    dense = _dense_llama()
    moe = _moe_builder()(dense, 4)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_experts_per_tok == 4
    ref = logits(dense, ids)
    torch.testing.assert_close(logits(moe, ids), ref, rtol=1e-5, atol=1e-5)
    d, m = copy.deepcopy(dense), copy.deepcopy(moe)
    rtn = {"method": "rtn", "bits": 4, "group_size": 16}
    hf_compress.compress(d, rtn, progress=False)
    hf_compress.compress(m, rtn, progress=False)
    a, b = logits(d, ids), logits(m, ids)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    d, m = copy.deepcopy(dense), copy.deepcopy(moe)
    gptq = {"method": "gptq", "bits": 4, "group_size": 16, "calibration": {"nsamples": 8, "seqlen": 32}}
    hf_compress.compress(d, gptq, calibration=calibration_ids(), progress=False)
    hf_compress.compress(m, gptq, calibration=calibration_ids(), progress=False)
    mlp, experts = d.model.layers[0].mlp, m.model.layers[0].mlp.experts
    for e in range(4):
        rows = slice(32 * e, 32 * (e + 1))
        want = torch.cat([mlp.gate_proj.weight[rows], mlp.up_proj.weight[rows]])
        torch.testing.assert_close(experts.gate_up_proj[e].weight, want, rtol=0, atol=0)


def test_sparse_moe_built_from_a_dense_model_sums_the_chosen_clusters(ids):
    """benchmarks/moe_model.py's sparse construction (4 experts of 32 neurons, top-2): the router's top-2 weights are
    1/2 within 1 % (scaled logits), so each block adds the chosen clusters' neurons of the dense MLP (down x 2 x 1/2),
    the MoEfication approximation; with top-k = E it would be the dense MLP itself."""
    dense = _dense_llama()
    moe = _moe_builder()(dense, 4, 2, calibration_ids())
    assert moe.config.num_experts_per_tok == 2
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    for layer_d, layer_m in zip(dense.model.layers, moe.model.layers):
        with torch.no_grad():
            _, weights, index = layer_m.mlp.gate(x)
            assert (2 * weights - 1).abs().max() < 0.01
            out = layer_m.mlp(x[None])[0]
            experts = layer_m.mlp.experts
            want = torch.zeros_like(out)
            for t in range(x.shape[0]):
                for e in index[t].tolist():
                    gate, up = F.linear(x[t], experts.gate_up_proj[e]).chunk(2)
                    want[t] += F.linear(F.silu(gate) * up, experts.down_proj[e]) / 2
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        # the experts are the dense MLP's neurons: all E clusters together give the dense MLP's output
        with torch.no_grad():
            total = sum(F.linear(F.silu(g) * u, experts.down_proj[e]) / 2
                        for e in range(4) for g, u in [F.linear(x, experts.gate_up_proj[e]).chunk(2, -1)])
            torch.testing.assert_close(total, layer_d.mlp(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- offload, resume
def test_disk_offloaded_moe_compresses_like_in_memory(tmp_path):
    """Offloaded experts are split into offloaded per-expert layers (each reads its slice through its own hook),
    so nothing of a block is read before its turn; the result equals the in-memory run's."""
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "dense")
    cal = calibration_ids()
    config = {"method": "gptq", "bits": 4, "group_size": 16, "calibration": {"nsamples": 8, "seqlen": 32}}
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    hf_compress.compress(ref, config, calibration=cal, progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                               offload_folder=str(tmp_path / "offload"))
    assert off.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    hf_compress.compress(off, config, calibration=cal, progress=False)
    x = cal[:2, :10]
    torch.testing.assert_close(logits(off, x), logits(ref, x), rtol=0, atol=0)
    skipped = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                                   offload_folder=str(tmp_path / "offload2"))
    native = skipped.model.layers[0].mlp.experts
    hf_compress.compress(skipped, {**config, "skip": ["experts"]}, calibration=cal, progress=False)
    assert skipped.model.layers[0].mlp.experts is native  # untouched offloaded experts: the very module back


def test_interrupted_moe_run_resumes_bit_identical(tmp_path, caplog):
    cal = calibration_ids()
    config = {"method": "gptq", "bits": 3, "group_size": 16, "calibration": {"nsamples": 8, "seqlen": 32}}
    full = tiny_moe("qwen3_moe")
    hf_compress.compress(full, config, calibration=cal, progress=False)

    class Stop(Exception):
        pass

    model = tiny_moe("qwen3_moe")
    state = tmp_path / "partial" / "state.json"

    def stop(module, args):
        if state.is_file():  # block 0 committed: die inside block 1
            raise Stop

    handle = model.model.layers[1].register_forward_pre_hook(stop)
    with pytest.raises(Stop):
        hf_compress.compress(model, config, calibration=cal, progress=False, checkpoint_dir=tmp_path / "partial",
                             checkpoint_every=0)
    handle.remove()
    resumed = tiny_moe("qwen3_moe")
    with caplog.at_level(logging.WARNING):
        hf_compress.compress(resumed, config, calibration=cal, progress=False, checkpoint_dir=tmp_path / "partial",
                             checkpoint_every=0)
    assert any("1/2 blocks already compressed" in r.message for r in caplog.records)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- bits per expert
def test_allocate_expert_bits_spends_the_budget_on_used_experts():
    from hf_compress.allocation import allocate_expert_bits

    sizes = {f"e{i}": 100 for i in range(4)}
    even = allocate_expert_bits({n: 0.25 for n in sizes}, sizes, [2, 3, 4], 3)
    assert even == {n: 3 for n in sizes}  # equal use: the uniform width
    skewed = allocate_expert_bits({"e0": 0.6, "e1": 0.3, "e2": 0.1, "e3": 0.0}, sizes, [2, 3, 4], 3)
    assert sum(skewed[n] * sizes[n] for n in sizes) <= 3 * sum(sizes.values())
    assert skewed["e0"] >= skewed["e1"] >= skewed["e2"] >= skewed["e3"] == 2
    # 4^-b error model: e2's 2->3 (0.1 x 3/64 per bit) buys more than e1's 3->4 (0.3 x 3/256)
    assert skewed == {"e0": 4, "e1": 3, "e2": 3, "e3": 2}
    assert allocate_expert_bits({"a": 1.0, "b": 0.0}, {"a": 10, "b": 30}, [2, 4], 2.5) == {"a": 4, "b": 2}


def test_expert_bits_from_routing_statistics(tmp_path):
    from hf_compress.statistics import expert_usage

    cal = calibration_ids()
    model = tiny_moe("qwen3_moe")
    probe = copy.deepcopy(model)
    split_experts(probe)
    names = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear) and ".experts." in n]
    usage = expert_usage(probe, names, [cal])  # the windows the pipeline measures routing on (no held-out for gptq)
    config = {"method": "gptq", "bits": 3, "expert_bits": [2, 3, 4], "expert_bits_by": "usage", "group_size": 16,
              "calibration": {"nsamples": 8, "seqlen": 32}}
    hf_compress.compress(model, config, calibration=cal, progress=False)
    layers = {n: m for n, m in compressed_modules(model).items() if ".experts." in n}
    bits = {n: m.bits for n, m in layers.items()}
    assert len(set(bits.values())) > 1  # skewed routing on random weights: mixed widths
    size = {n: m.in_features * m.out_features for n, m in layers.items()}
    assert sum(bits[n] * size[n] for n in bits) <= 3 * sum(size.values())
    for n in bits:  # a more used expert never has fewer bits than a less used one of the same shape and block
        for k in bits:
            if k.rpartition(".")[0] == n.rpartition(".")[0] and usage[n] > usage[k]:
                assert bits[n] >= bits[k], (n, k)
    assert all(m.bits == 3 for n, m in compressed_modules(model).items() if ".experts." not in n)
    ids = cal[:2, :10]
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.quantization_config.expert_bits == [2, 3, 4]
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), out, rtol=0, atol=0)
    with pytest.raises(hf_compress.errors.ConfigError, match="needs calibration data"):
        hf_compress.compress(tiny_moe("qwen3_moe"), {"method": "rtn", "bits": 3, "expert_bits": [2, 4]}, progress=False)
    with pytest.raises(hf_compress.errors.ConfigError, match="must lie within"):
        hf_compress.CompressionConfig(method="rtn", bits=4, expert_bits=[2, 3])


def test_expert_errors_are_each_layers_routed_output_error():
    """`expert_errors`: for expert e's layer at b bits, Σ_t w_t² ‖f_e^b(x_t) − f_e(x_t)‖² over the block's output
    energy, on the tokens the router sends to e (recomputed here by hand for two layers); the allocation by these
    errors spends the same budget, and on this model (use spread 0.10-0.15, measured 2-bit errors ~6x the 3-bit
    ones) the 2->3 steps buy more than any 3->4 step: every layer gets the uniform width."""
    from hf_compress.allocation import allocate_expert_bits
    from hf_compress.methods.rtn import RTN
    from hf_compress.statistics import expert_errors, expert_usage

    model = tiny_moe("qwen3_moe")
    split_experts(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".experts." in n]
    cal = calibration_ids()
    errors = expert_errors(model, names, [cal], [2, 3, 4], 16)
    assert set(errors) == set(names)
    experts = model.model.layers[1].mlp.experts
    seen = {}
    handle = experts.register_forward_hook(lambda m, a, out: seen.update(x=a[0], index=a[1], w=a[2], y=out))
    with torch.no_grad():
        model(input_ids=cal, use_cache=False)
    handle.remove()
    for e, weight in [(0, "gate_up_proj"), (3, "down_proj")]:
        tok, pos = torch.where(seen["index"] == e)
        x, w2 = seen["x"][tok], seen["w"][tok, pos].double() ** 2
        layer = getattr(experts, weight)[e]
        dense = layer.weight.detach().clone()
        with torch.no_grad():
            ref = experts.expert(e, x).double()
            layer.weight.copy_(RTN().quantize(dense, 2, 16, scale_dtype=torch.float16).dequantize(dense.shape[1]))
            err = float(((experts.expert(e, x).double() - ref).pow(2).sum(-1) * w2).sum())
            layer.weight.copy_(dense)
        want = err / float(seen["y"].double().pow(2).sum())
        got = errors[f"model.layers.1.mlp.experts.{weight}.{e}"][2]
        assert got == pytest.approx(want, rel=1e-6)
        assert got > errors[f"model.layers.1.mlp.experts.{weight}.{e}"][3] > errors[f"model.layers.1.mlp.experts.{weight}.{e}"][4] > 0
    usage = expert_usage(model, names, [cal])
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    assert allocate_expert_bits(usage, sizes, [2, 3, 4], 3, errors) == {n: 3 for n in names}
    # a layer whose measured error falls steeply past 3 bits gets 4 bits, paid for by the flattest layers
    steep = {**errors, names[0]: {2: 1.0, 3: 0.5, 4: 0.0}}
    bits = allocate_expert_bits(usage, sizes, [2, 3, 4], 3, steep)
    assert bits[names[0]] == 4 and sum(bits[n] * sizes[n] for n in names) <= 3 * sum(sizes.values())
    assert any(b == 2 for b in bits.values())


def test_a_checkpoint_missing_one_experts_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_moe("mixtral")
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16}, progress=False)
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.experts.down_proj.5.scales"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(hf_compress.errors.CheckpointError, match=r"experts\.down_proj\.5\.scales"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [16, 32], ids=["g16-reference", "g32-cpu-kernel"])
def test_one_token_path_is_the_routed_path_bit_for_bit(arch, dtype, group_size, monkeypatch):
    """A batch-1 decode step (one token) skips the routing masks (`_one_token`); its output is the general path's
    (`_routed`) exactly, for dense and compressed experts, fp32 and bf16, on the reference kernel (g16) and the CPU
    kernel's decode path (g32)."""
    from hf_compress.modules import experts as experts_module

    model = tiny_moe(arch).to(dtype)
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": group_size, "skip": ["layers.1"]},
                         progress=False)
    split_experts(model)  # layer 1's experts as dense per-expert slots
    used = []
    monkeypatch.setattr(experts_module, "_one_token",
                        lambda *a, _f=experts_module._one_token: used.append(1) or _f(*a))
    gen = torch.Generator().manual_seed(0)
    modules = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    assert any(isinstance(m.down_proj[0], QuantLinear) for m in modules) or arch == "deepseek_v3"  # 1 MoE layer
    for module in modules:
        k = model.config.num_experts_per_tok
        for _ in range(4):
            x = torch.randn(1, model.config.hidden_size, generator=gen).to(dtype)
            index = torch.randperm(module.num_experts, generator=gen)[:k].view(1, k)
            weights = torch.rand(1, k, generator=gen).softmax(-1).to(dtype)
            with torch.no_grad():
                fast = module(x, index, weights)
                ref = experts_module._routed(module, x, index, weights)
            assert torch.equal(fast, ref)
    assert len(used) == 4 * len(modules)
    if group_size == 32 and arch != "deepseek_v3":  # the compressed experts ran the CPU kernel's decode path
        assert any("decode" in m._kernel_cache for m in model.modules() if isinstance(m, QuantLinear))


# ----------------------------------------------------------------------------------------------- expert pruning
def _masked_block(block, x, kept, norm_topk):
    """Reference: the ORIGINAL block with the dropped experts' router logits at -inf (softmax over the kept experts,
    top-k among them, renormalised when the model does), their outputs summed by routing weight."""
    from hf_compress.transforms.expert_pruning import _native_expert

    logits = F.linear(x, block.gate.weight).float()
    mask = torch.full_like(logits, float("-inf"))
    mask[:, kept] = 0
    probs = torch.softmax(logits + mask, dim=-1)
    top, index = probs.topk(block.gate.top_k, dim=-1)
    if norm_topk:
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(top[t].tolist(), index[t].tolist()):
            assert e in kept
            out[t] += w * _native_expert(block.experts, e, x[t:t + 1])[0]
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_expert_prune_removes_the_least_important_experts_and_routes_among_the_rest(arch, tmp_path):
    from hf_compress.transforms.expert_pruning import expert_importance, prune_experts

    model = tiny_moe(arch)
    original = copy.deepcopy(model)
    cal = calibration_ids()
    scores = expert_importance(original, [cal])
    report = prune_experts(model, 0.25, [cal])
    assert report["experts"] == (8, 6)
    count = "num_experts" if arch == "qwen3_moe" else "num_local_experts"
    assert getattr(model.config, count) == 6
    x = torch.randn(40, 48, generator=torch.Generator().manual_seed(4))
    for i, (orig, pruned) in enumerate(zip(original.model.layers, model.model.layers)):
        name = f"model.layers.{i}.mlp"
        kept, dropped = report["kept"][name], report["dropped"][name]
        assert len(dropped) == 2 and min(scores[name][kept]) >= max(scores[name][dropped])
        assert pruned.mlp.experts.gate_up_proj.shape[0] == 6 and pruned.mlp.gate.weight.shape[0] == 6
        with torch.no_grad():
            _, _, index = pruned.mlp.gate(x)
            assert int(index.max()) < 6
            want = _masked_block(orig.mlp, x, kept, arch == "mixtral" or original.config.norm_topk_prob)
            torch.testing.assert_close(pruned.mlp(x[None])[0], want, rtol=1e-5, atol=1e-6)
    # compress with it: stored, reported, reloads into the native class with 6 experts
    model = tiny_moe(arch)
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16, "expert_prune": 0.25,
                                 "calibration": {"nsamples": 8, "seqlen": 32}}, calibration=cal, progress=False)
    per_expert = sum(p.numel() for p in original.model.layers[0].mlp.experts.parameters()) // 8 + 48
    removed = 2 * per_expert * 2  # 2 experts (and their router rows) in each of 2 blocks
    record = model.config.quantization_config.pruned_experts
    assert record["parameters"] == removed and record["experts"] == [8, 6]
    coverage = hf_compress.coverage_report(model)
    assert coverage.pruned == removed and "experts pruned" in coverage.format_table()
    assert coverage.total == sum(p.numel() for p in original.parameters()) - removed
    assert coverage["experts"].fraction == 1.0
    ids = cal[:2, :10]
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(original) and getattr(loaded.config, count) == 6
    torch.testing.assert_close(logits(loaded, ids), out, rtol=0, atol=0)
    assert hf_compress.coverage_report(loaded).pruned == removed


def test_expert_prune_refuses_what_it_cannot_do():
    from hf_compress.transforms.expert_pruning import prune_experts

    with pytest.raises(hf_compress.errors.ConfigError, match="strictly between 0 and 1"):
        hf_compress.CompressionConfig(method="rtn", bits=4, expert_prune=1.0)
    with pytest.raises(hf_compress.errors.ConfigError, match="needs calibration data"):
        hf_compress.compress(tiny_moe("mixtral"), {"method": "rtn", "bits": 4, "expert_prune": 0.25}, progress=False)
    with pytest.raises(hf_compress.errors.ConfigError, match="keep at least num_experts_per_tok"):
        prune_experts(tiny_moe("mixtral"), 0.9, [calibration_ids()])
    with pytest.raises(hf_compress.errors.ConfigError, match="no mixture-of-experts block"):
        prune_experts(_dense_llama(), 0.25, [calibration_ids()])
    from accelerate import cpu_offload  # weights on meta, read through offload hooks: refused, not half-pruned

    offloaded = cpu_offload(tiny_moe("mixtral"), execution_device=torch.device("cpu"))
    with pytest.raises(UnsupportedModuleError, match="offloaded"):
        prune_experts(offloaded, 0.25, [calibration_ids()])


# ----------------------------------------------------------------------------------------------- removal as a width
def test_allocate_expert_bits_with_removal_spends_the_budget_and_keeps_top_k():
    """Width 0 removes an expert (cost 0 bits, error = its importance): every block removes the same number, the
    least important first, at least ``keep`` stay, and the removed bits pay for wider experts."""
    from hf_compress.allocation import allocate_expert_bits

    blocks = {f"b{i}": [f"b{i}.e{e}" for e in range(4)] for i in range(2)}
    units = [u for us in blocks.values() for u in us]
    sizes = {u: 100 for u in units}
    importance = {"b0.e0": 0.01, "b0.e1": 1.0, "b0.e2": 2.0, "b0.e3": 3.0,
                  "b1.e0": 2.0, "b1.e1": 3.0, "b1.e2": 0.02, "b1.e3": 1.0}
    # relative error 0.5 at 3 bits, 0.1 at 4: removing an unimportant expert buys 4 bits for three others
    errors = {u: {0: importance[u], 3: 0.5 * importance[u], 4: 0.1 * importance[u]} for u in units}
    usage = {u: 1.0 for u in units}
    bits = allocate_expert_bits(usage, sizes, [0, 3, 4], 3, errors, blocks=blocks, keep=2)
    assert bits == {"b0.e0": 0, "b0.e1": 4, "b0.e2": 4, "b0.e3": 4, "b1.e0": 4, "b1.e1": 4, "b1.e2": 0, "b1.e3": 4}
    assert sum(bits[u] * sizes[u] for u in units) == 3 * sum(sizes.values())  # exactly the budget
    # removal dearer than the widths it pays for: nothing removed, the uniform width
    flat = {u: {0: 1.0, 3: 0.1, 4: 0.09} for u in units}
    assert allocate_expert_bits(usage, sizes, [0, 3, 4], 3, flat, blocks=blocks, keep=2) == {u: 3 for u in units}
    # a block must keep ``keep`` experts: with keep=4 nothing can go
    assert all(b == 3 for b in allocate_expert_bits(usage, sizes, [0, 3, 4], 3, errors, blocks=blocks, keep=4).values())
    # a tight budget removes as many as it must, never below keep
    tight = allocate_expert_bits(usage, sizes, [0, 3, 4], 1.5, errors, blocks=blocks, keep=2)
    assert [sum(tight[u] > 0 for u in us) for us in blocks.values()] == [2, 2]
    assert sum(tight[u] * sizes[u] for u in units) <= 1.5 * sum(sizes.values())
    with pytest.raises(hf_compress.errors.ConfigError, match="cannot be met"):
        allocate_expert_bits(usage, sizes, [0, 4], 1.5, errors, blocks=blocks, keep=2)
    with pytest.raises(hf_compress.errors.ConfigError, match="needs measured costs"):
        allocate_expert_bits(usage, sizes, [0, 3, 4], 3, blocks=blocks)


def test_expert_costs_are_the_routed_output_errors():
    """`expert_costs`: removing expert e costs Σ_t w_t ‖f_e(x_t)‖ (its importance, as `expert_prune` ranks), width b
    costs Σ_t w_t ‖f_e^b(x_t) − f_e(x_t)‖ with all of e's layers rounded to b bits (recomputed here by hand)."""
    from hf_compress.methods.rtn import RTN
    from hf_compress.transforms.expert_pruning import _native_expert, expert_costs, expert_importance

    model = tiny_moe("mixtral")
    cal = calibration_ids()
    costs = expert_costs(model, [cal], [2, 4], 16, max_tokens=10**6)
    importance = expert_importance(model, [cal])
    block = model.model.layers[1].mlp
    seen = {}
    handle = block.experts.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], index=a[1], w=a[2]))
    with torch.no_grad():
        model(input_ids=cal, use_cache=False)
    handle.remove()
    for e in (0, 5):
        tok, pos = torch.where(seen["index"] == e)
        x, w = seen["x"][tok], seen["w"][tok, pos].double()
        with torch.no_grad():
            y = _native_expert(block.experts, e, x).double()
            rounded = {k: RTN().quantize(getattr(block.experts, k)[e].float(), 4, 16, scale_dtype=torch.float16)
                       .dequantize(getattr(block.experts, k).shape[2]) for k in ("gate_up_proj", "down_proj")}
            y4 = _native_expert(block.experts, e, x, rounded).double()
        got = costs["model.layers.1.mlp"][e]
        assert got[0] == pytest.approx(float((w * y.norm(dim=-1)).sum()), rel=1e-9)
        assert got[0] == pytest.approx(float(importance["model.layers.1.mlp"][e]), rel=1e-12)
        assert got[4] == pytest.approx(float((w * (y4 - y).norm(dim=-1)).sum()), rel=1e-6)
        assert got[0] > got[2] > got[4] > 0


@pytest.mark.parametrize("arch,method", [("qwen3_moe", "rtn"), ("mixtral", "gptq")])
def test_expert_bits_with_removal_compresses_within_budget_and_reloads(arch, method, tmp_path):
    """``expert_bits=[0, 3, 4]`` at ``bits=3``: the allocation of `allocate_expert_bits` on `expert_costs` (every block
    the same number removed, top-k kept), the removed experts gone as `expert_prune` removes them (router rows, config
    count), the kept experts' layers at one width each, exactly the budget in stored code bits per original expert
    weight; recorded, reported, and reloaded into the native class with the same logits."""
    from hf_compress.allocation import allocate_expert_bits
    from hf_compress.transforms.expert_pruning import expert_costs

    model = tiny_moe(arch)
    original = copy.deepcopy(model)
    cal = calibration_ids()
    config = {"method": method, "bits": 3, "group_size": 16, "expert_bits": [0, 3, 4],
              "calibration": {"nsamples": 8, "seqlen": 32}}
    hf_compress.compress(model, config, calibration=cal, progress=False)
    qconfig = model.config.quantization_config
    assert qconfig.expert_bits_by == "importance"
    record = qconfig.pruned_experts
    e_left = record["experts"][1]
    assert record["experts"][0] == 8 and 2 <= e_left < 8  # something removed, at least top-k (2) kept
    # the same choice as the allocation on the measured costs
    costs = expert_costs(copy.deepcopy(original), [cal], [3, 4], 16)
    units = {n: [f"{n}.experts.{e}" for e in range(8)] for n in costs}
    errors = {u: costs[n][e] for n, us in units.items() for e, u in enumerate(us)}
    per_expert = sum(w[0].numel() for w in (original.model.layers[0].mlp.experts.gate_up_proj,
                                            original.model.layers[0].mlp.experts.down_proj))
    want = allocate_expert_bits({u: 1.0 for u in errors}, {u: per_expert for u in errors}, [0, 3, 4], 3, errors,
                                blocks=units, keep=2)
    for n, us in units.items():
        assert record["dropped"][n] == [e for e, u in enumerate(us) if want[u] == 0]
    assert record["widths"] == {str(b): sum(v == b for v in want.values()) for b in sorted(set(want.values()))}
    count = "num_experts" if arch == "qwen3_moe" else "num_local_experts"
    assert getattr(model.config, count) == e_left
    layers = {n: m for n, m in compressed_modules(model).items() if ".experts." in n}
    assert len(layers) == 2 * 2 * e_left  # 2 layers per expert, 2 blocks
    for n, m in layers.items():  # an expert's layers share its width
        other = n.replace("gate_up_proj", "down_proj") if "gate_up_proj" in n else n.replace("down_proj", "gate_up_proj")
        assert m.bits == layers[other].bits and m.bits in (3, 4)
    stored = sum(m.bits * m.in_features * m.out_features for m in layers.values())
    assert stored == 3 * per_expert * 8 * 2  # the budget, exactly, over the original 8 experts of 2 blocks
    assert all(m.bits == 3 for n, m in compressed_modules(model).items() if ".experts." not in n)
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.shape[0] == e_left
    assert hf_compress.coverage_report(model).pruned == record["parameters"] > 0
    ids = cal[:2, :10]
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(original) and getattr(loaded.config, count) == e_left
    assert loaded.config.quantization_config.expert_bits == [0, 3, 4]
    assert loaded.config.quantization_config.pruned_experts == record
    torch.testing.assert_close(logits(loaded, ids), out, rtol=0, atol=0)


def test_expert_bits_with_removal_refuses_bad_configs():
    cal = calibration_ids()
    ConfigError = hf_compress.errors.ConfigError
    with pytest.raises(ConfigError, match="needs calibration data"):
        hf_compress.compress(tiny_moe("mixtral"), {"method": "rtn", "bits": 3, "expert_bits": [0, 3, 4]},
                             progress=False)
    with pytest.raises(ConfigError, match="no mixture-of-experts block"):
        hf_compress.compress(_dense_llama(), {"method": "rtn", "bits": 3, "expert_bits": [0, 3, 4],
                                              "calibration": {"nsamples": 8, "seqlen": 32}}, calibration=cal,
                             progress=False)
    with pytest.raises(ConfigError, match="needs expert_bits_by='importance'"):
        hf_compress.CompressionConfig(method="rtn", bits=3, expert_bits=[0, 3, 4], expert_bits_by="usage")
    with pytest.raises(ConfigError, match="at least one width above 0"):
        hf_compress.CompressionConfig(method="rtn", bits=3, expert_bits=[0])
    with pytest.raises(ConfigError, match="drop expert_prune"):
        hf_compress.CompressionConfig(method="rtn", bits=3, expert_bits=[0, 3, 4], expert_prune=0.25)
    with pytest.raises(ConfigError, match="expert_bits must be bit widths"):
        hf_compress.CompressionConfig(method="rtn", bits=3, expert_bits=[-1, 3])
    with pytest.raises(ConfigError, match="quantization bit widths"):
        hf_compress.CompressionConfig(method="svd", ratio=0.5, expert_bits=[0, 3])
