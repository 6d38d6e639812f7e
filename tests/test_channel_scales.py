"""Activation-aware channel scales (``channel_scales="awq"``, `hf_compress.transforms.channel_scales`): folding is
exact for every mapping found (grouped-query attention included), a mapping that is not exact is left out with its
reason, the search's objective equals the output error of the rounded scaled weights computed independently and never
exceeds the unscaled one, a compressed model saves and reloads, a killed run resumes bit for bit, bad input is
refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM

import hf_compress
from conftest import VOCAB, _decoder_kwargs, make_tiny, output_of
from hf_compress import CompressionConfig
from hf_compress.calibration import BlockwiseRunner
from hf_compress.errors import ConfigError
from hf_compress.methods import get_method
from hf_compress.transforms import channel_scales as cs
from test_resume import TEXT, dense4, resumed_equals_full_run  # noqa: F401  (dense4: a fixture)

CAL = {"nsamples": 8, "seqlen": 32, "batch_size": 4}
ALL = {"input_layernorm -> q_proj/k_proj/v_proj", "post_attention_layernorm -> gate_proj/up_proj",
       "self_attn.v_proj -> o_proj", "mlp.up_proj -> down_proj"}


def _windows(seed=1, n=CAL["nsamples"]):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, CAL["seqlen"]), generator=g)


def _block0(model):
    """(runner with block 0's inputs captured, block 0, its first batch of hidden states, its Linear layers)."""
    blocks = model.model.layers
    runner = BlockwiseRunner(model, blocks, _windows(), batch_size=4)
    runner.capture()
    block = blocks[0]
    linear = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    return runner, block, runner.hidden[0], linear


def _fold_everything(model, seed=0):
    """Fold random scales (e^±0.7) into every mapping of every block; returns the mappings found in block 0."""
    first = None
    g = torch.Generator().manual_seed(seed)
    for i, block in enumerate(model.model.layers):
        runner = BlockwiseRunner(model, model.model.layers, _windows(), batch_size=4)
        runner.capture()
        hidden = runner.hidden[0]
        for b in range(i):
            hidden = runner.run(b, model.model.layers[b], [hidden])[0]
        linear = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        found = cs.candidates(block, linear, runner, i, hidden)
        first = first or found
        for m in found:
            n = block.get_submodule(m.producer).weight.shape[0]
            cs.fold(block, m, torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-0.7, 0.7, generator=g)))
    return first


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_folding_every_mapping_is_exact(arch):
    """Random scales folded into all four mappings of every block (grouped-query attention: 4 query heads over 2 kv
    heads) leave the logits unchanged (fp32 rounding of the folded weights only)."""
    model = make_tiny(arch)
    ids = _windows(seed=5, n=2)
    before = output_of(model, ids)
    found = _fold_everything(model)
    assert {m.name for m in found} == ALL
    gqa = next(m for m in found if m.readers == ["self_attn.o_proj"])
    assert gqa.repeat == (2, 2, 12)  # 2 kv heads, 2 query heads each, head size 48 / 4
    after = output_of(model, ids)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


def test_scales_of_kv_heads_repeat_for_their_query_heads():
    m = cs.Mapping("v", "linear", ["o"], (2, 3, 2))
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert cs.reader_scales(m, s).tolist() == [1, 2, 1, 2, 1, 2, 3, 4, 3, 4, 3, 4]


def test_a_norm_whose_weight_does_not_scale_its_output_is_left_out():
    """Gemma's RMSNorm multiplies by (1 + γ): dividing γ by s does not divide the output by s. The check on the block
    leaves both norm mappings out with the reason, keeps v->o and up->down, and restores the weights exactly."""
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(**_decoder_kwargs(), head_dim=12)).eval()
    runner, block, hidden, linear = _block0(model)
    found = cs.candidates(block, linear, runner, 0, hidden)
    assert {m.name for m in found} == ALL
    weights = {n: p.detach().clone() for n, p in block.named_parameters()}
    kept, left = cs.exact(block, found, runner, 0, hidden)
    assert {m.name for m in kept} == {"self_attn.v_proj -> o_proj", "mlp.up_proj -> down_proj"}
    assert set(left) == {"input_layernorm -> q_proj/k_proj/v_proj", "post_attention_layernorm -> gate_proj/up_proj"}
    assert all("outputs moved by" in why and "does not scale its output" in why for why in left.values())
    assert all(torch.equal(p, weights[n]) for n, p in block.named_parameters())


def test_left_out_mappings_are_reported(caplog):
    """A whole run on the Gemma model: the report lists the four norm mappings left out (two per block) by full name,
    and a warning names them."""
    import logging

    from hf_compress.pipelines import compress_modules

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(**_decoder_kwargs(), head_dim=12)).eval()
    cfg = CompressionConfig(method="rtn", bits=4, group_size=16, channel_scales="awq", calibration=CAL)
    with caplog.at_level(logging.WARNING, logger="hf_compress.pipelines.sequential"):
        report = compress_modules(model, cfg, calibration=_windows(), progress=False)
    rep = report["channel_scales"]
    assert rep["mappings"] == 4 and sorted(rep["left"]) == sorted(
        f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm -> q_proj/k_proj/v_proj",
                                                          "post_attention_layernorm -> gate_proj/up_proj"))
    assert "left out 4 mapping(s)" in caplog.text and "model.layers.0.input_layernorm" in caplog.text


def test_a_norm_read_outside_the_targets_is_not_a_mapping():
    """With gate_proj not a target, post_attention_layernorm's output has a reader whose columns would not be scaled:
    no mapping for that norm."""
    model = make_tiny("llama")
    runner, block, hidden, linear = _block0(model)
    del linear["mlp.gate_proj"]
    names = {m.name for m in cs.candidates(block, linear, runner, 0, hidden)}
    assert names == ALL - {"post_attention_layernorm -> gate_proj/up_proj"} | {"post_attention_layernorm -> up_proj"}
    found = [m for m in cs.candidates(block, linear, runner, 0, hidden) if m.producer == "post_attention_layernorm"]
    kept, left = cs.exact(block, found, runner, 0, hidden)
    assert not kept and list(left) == ["post_attention_layernorm -> up_proj"]


@pytest.mark.parametrize("bits, group", [(3, 16), (4, 48)])
def test_search_objective_is_the_rounded_layers_output_error(bits, group):
    """The chosen scales' error equals Σ tr(E H Eᵀ) computed independently: rtn's own codes of W·diag(s),
    dequantized, divided by s. It never exceeds the unscaled error, which is the ``before`` figure."""
    torch.manual_seed(0)
    n = 48
    x = torch.randn(4096, n, dtype=torch.float64) * torch.logspace(-1, 1, n, dtype=torch.float64)  # uneven channels
    h = x.T @ x / x.shape[0]
    weights = [torch.randn(32, n), torch.randn(16, n)]
    m = cs.Mapping("norm", "norm", ["a", "b"])
    res = cs.search(m, weights, x.abs().mean(0), h, [(bits, group)] * 2, torch.float16)
    rtn = get_method("rtn")()

    def error(cols):
        total = 0.0
        for w in weights:
            q = rtn.quantize(w * cols[None, :], bits, group, None, torch.float16).dequantize()[:, :n]
            e = (w.double() - q.double() / cols.double()[None, :])
            total += float(torch.trace(e @ h @ e.T))
        return total

    assert res["error"]["before"] == pytest.approx(error(torch.ones(n)), rel=1e-4)
    assert res["scales"] is not None and res["alpha"] is not None  # channels spanning 100x: scaling pays
    assert res["error"]["after"] == pytest.approx(error(res["scales"].float()), rel=1e-4)
    assert res["error"]["after"] < 0.9 * res["error"]["before"]
    s = res["scales"].double()
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)  # normalised as AWQ does


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_compressed_model_saves_and_reloads(method, tmp_path):
    """The config stores the option; the checkpoint reloads with from_pretrained and computes what the compressed
    model computed (the folded norm weights are plain weights of the model's class)."""
    model = make_tiny("llama")
    cfg = {"method": method, "bits": 3, "group_size": 16, "channel_scales": "awq", "calibration": CAL}
    hf_compress.compress(model, cfg, calibration=_windows(), progress=False)
    config = model.config.quantization_config
    assert config.to_dict()["channel_scales"] == "awq"
    ids = _windows(seed=7, n=2)
    out = output_of(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(output_of(loaded, ids), out, atol=1e-5, rtol=0)
    dense = make_tiny("llama")
    norms = [n for n, _ in dense.named_parameters() if "layernorm" in n]
    changed = [n for n in norms if not torch.equal(dense.get_parameter(n), loaded.get_parameter(n))]
    assert changed  # the scales live in the norm weights


def test_report_counts_mappings_and_errors():
    from hf_compress.pipelines import compress_modules

    model = make_tiny("llama")
    cfg = CompressionConfig(method="rtn", bits=3, group_size=16, channel_scales="awq", calibration=CAL)
    report = compress_modules(model, cfg, calibration=_windows(), progress=False)
    rep = report["channel_scales"]
    assert rep["kind"] == "awq" and rep["mappings"] == 8 and not rep["left"]
    assert 1 <= rep["scaled"] <= 8 and 0 < rep["error_ratio"] <= 1
    for block in rep["blocks"].values():
        assert set(block["mappings"]) == ALL
        for c in block["mappings"].values():
            assert c["after"] <= c["before"]
            assert (c["alpha"] is None) == (c["after"] == c["before"])


def test_scales_change_the_quantized_model_and_not_the_dense_function():
    """Without quantization error the fold would be invisible; with it, the scaled run's layers differ from the plain
    run's, and the scaled run's norm weights are the dense ones divided by the chosen scales (checked through the
    dense function: dequantized scaled model ≈ dense on the calibration windows at 8 bits)."""
    ids = _windows()
    plain, scaled = make_tiny("llama"), make_tiny("llama")
    dense_out = output_of(make_tiny("llama"), ids)
    common = {"method": "rtn", "bits": 8, "group_size": 16, "calibration": CAL}
    hf_compress.compress(plain, common, calibration=ids, progress=False)
    hf_compress.compress(scaled, {**common, "channel_scales": "awq"}, calibration=ids, progress=False)
    a = scaled.model.layers[0].self_attn.q_proj
    b = plain.model.layers[0].self_attn.q_proj
    assert not torch.equal(a.qweight, b.qweight)
    err = (output_of(scaled, ids) - dense_out).abs().max() / dense_out.abs().max()
    assert err < 2e-2  # 8-bit rounding only: the folded scales computed the dense function


def test_killed_run_resumes_bit_identical(dense4, tmp_path):  # noqa: F811
    """The folded norm weights of finished blocks (outside the targets the checkpoint stores) come back."""
    common = ["--method", "rtn", "--bits", "3", "--group-size", "16", "--channel-scales", "awq",
              "--calib", TEXT, "--nsamples", "8", "--seqlen", "32", "--checkpoint-every", "0"]
    stdout, state, tensors = resumed_equals_full_run(dense4, tmp_path, common)
    assert "channel scales (awq): " in stdout and " of 16 mappings scaled, 0 left out" in stdout
    assert set(state["extra"]["scaled"]) == {"0", "1"}
    assert any("layernorm" in k and not torch.equal(t, torch.ones_like(t)) for k, t in tensors.items())


def test_bad_input_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"channel_scales must be one of \['awq'\]"):
        CompressionConfig(method="rtn", bits=3, channel_scales="smooth")
    with pytest.raises(ConfigError, match="use it with rtn, hqq or gptq, not 'svd'"):
        CompressionConfig(method="svd", ratio=0.3, channel_scales="awq")
    with pytest.raises(ConfigError, match="'rtn with channel_scales' needs calibration data"):
        hf_compress.compress(make_tiny("llama"), {"method": "rtn", "bits": 3, "channel_scales": "awq"}, progress=False)
    assert "channel_scales" not in CompressionConfig(method="rtn", bits=3).to_dict()


def test_offloaded_layers_refused(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map={"model.embed_tokens": "cpu",
                                                                            "model.layers.0": "cpu",
                                                                            "model.layers.1": "disk",
                                                                            "model.norm": "cpu", "lm_head": "cpu"},
                                                 offload_folder=str(tmp_path / "offload"))
    with pytest.raises(ConfigError, match=r"channel_scales='awq' folds scales .* targeted layers are offloaded"):
        hf_compress.compress(model, {"method": "rtn", "bits": 3, "group_size": 16, "channel_scales": "awq",
                                     "calibration": CAL}, calibration=_windows(), progress=False)
