"""Learned rounding and clipping (``learn_rounding``, `hf_compress.pipelines.reconstruct`): it starts exactly from
rtn/gptq's codes, keeps its offsets and clipping factors in bounds, lowers the block's output error against the dense
block computed independently, stores the format rtn/gptq store, resumes bit for bit, and refuses bad options."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_compress
from conftest import VOCAB, make_tiny, output_of
from hf_compress import CompressionConfig
from hf_compress.errors import ConfigError
from hf_compress.methods import get_method
from hf_compress.modules import QuantLinear
from hf_compress.pipelines import reconstruct
from test_resume import TEXT, dense4, resumed_equals_full_run  # noqa: F401  (dense4: a fixture)

CAL = {"nsamples": 8, "seqlen": 32, "batch_size": 4}


def _windows(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (CAL["nsamples"], CAL["seqlen"]), generator=g)


def _block0_mse(model, dense_out, windows) -> float:
    """MSE of block 0's output (hidden_states[1]) against the dense model's, over every calibration window."""
    with torch.no_grad():
        h = model(input_ids=windows, output_hidden_states=True).hidden_states[1]
    return (h.double() - dense_out.double()).square().mean().item()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_learned_block_output_error_not_above_the_methods(method):
    """Block 0 sees the same inputs (the embeddings) in every model: its output error against the dense block, on the
    calibration windows, must not be larger with learned rounding than with the method's own codes; from rtn's codes
    the learning finds a clearly better one."""
    windows = _windows()
    dense = make_tiny("llama")
    with torch.no_grad():
        target = dense(input_ids=windows, output_hidden_states=True).hidden_states[1]
    base = hf_compress.compress(make_tiny("llama"), {"method": method, "bits": 3, "group_size": 16, "calibration": CAL},
                                calibration=windows, progress=False)
    learned = hf_compress.compress(make_tiny("llama"), {"method": method, "bits": 3, "group_size": 16, "calibration": CAL,
                                                        "learn_rounding": {"iters": 60, "batch_size": 2}},
                                   calibration=windows, progress=False)
    e_base, e_learned = _block0_mse(base, target, windows), _block0_mse(learned, target, windows)
    # never worse (the learned codes are kept only when the block's error does not grow); from gptq's codes the
    # learning may find nothing better at 60 steps (torch 2.13 keeps gptq's block 0 here, torch 2.14 improves it)
    assert e_learned <= e_base, (e_base, e_learned)
    if method == "rtn":  # a clear gain (measured ~3x lower on this model); not a tuned threshold
        assert e_learned < 0.8 * e_base, (e_base, e_learned)
    # the same format as rtn/gptq: packed codes, scales and zeros per group, stored like theirs
    layer = learned.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.bits == 3 and layer.group_size == 16 and layer.rank == 0
    assert learned.config.quantization_config.learn_rounding == {"iters": 60, "lr": 1 / 60, "batch_size": 2,
                                                                 "min_clip": 0.5, "seed": 0}


def _quantized_of(method, weight, stats=None):
    return get_method(method)().quantize(weight, 3, 16, stats, torch.float16)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_starting_point_is_the_methods_result(method):
    """With V = 0 and α = β = 1 the learnable layer stores exactly the method's codes, scales and zeros (for gptq:
    from its error-compensated columns), and computes with their dequantized weight."""
    from hf_compress.calibration import LayerStats

    torch.manual_seed(0)
    w = torch.randn(24, 40)  # 40 = 2 full groups of 16 + a partial group of 8
    x = torch.randn(200, 40)
    stats = LayerStats(gram=(x.T @ x).double(), count=200)
    q = _quantized_of(method, w, stats)
    assert (q.continuous is None) == (method == "rtn")
    lrn = reconstruct.Learnable(q.continuous if q.continuous is not None else w, q, None, 0.5)
    again = lrn.quantized(torch.float16)
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scales, q.scales)
    assert torch.equal(again.zeros, q.zeros)
    with torch.no_grad():
        assert torch.allclose(lrn(x), x @ q.dequantize().T, rtol=1e-5, atol=1e-5)


def test_offsets_and_clipping_stay_in_bounds_and_codes_in_range():
    """After training with a large step, V ∈ [-0.5, 0.5], α, β ∈ [min_clip, 1] and the stored codes lie in
    [0, 2^bits - 1]; the trained layer's float forward equals the stored result's."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
    inputs = [torch.randn(4, 8, 32) for _ in range(3)]
    with torch.no_grad():
        targets = [block(x) for x in inputs]
    learnables = {}
    for name in ("0", "2"):
        layer = block.get_submodule(name)
        q = _quantized_of("rtn", layer.weight.detach())
        learnables[name] = reconstruct.Learnable(layer.weight.detach(), q, layer.bias.detach(), 0.7)
        block._modules[name] = learnables[name]

    class Call:
        args, kwargs = (), {}

    losses = reconstruct.train(block, learnables, inputs, targets, [Call()] * 3,
                               {"iters": 40, "lr": 0.4, "batch_size": 2}, seed=0)
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    for lrn in learnables.values():
        assert lrn.v.abs().max() <= 0.5 and lrn.v.abs().max() == 0.5  # the large step reaches the bound
        for f in (lrn.alpha, lrn.beta):
            assert f.min() >= 0.7 and f.max() <= 1.0
        assert lrn.alpha.min() < 1.0  # the clipping moved
        q = lrn.quantized(torch.float16)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 7
        assert torch.equal(q.zeros, q.zeros.round()) and q.zeros.min() >= 0 and q.zeros.max() <= 7
        with torch.no_grad():  # the trained codes are the stored ones, but where the fp16 rounding of the scale
            s, z = lrn.grid()  # moves a value across a rounding boundary (V sits at ±0.5 for many weights)
            trained = (lrn.w / s[..., None] + z[..., None] + lrn.v).round().clamp(0, 7).reshape(q.codes.shape[0], -1)
        assert (trained[:, : lrn.in_features] != q.codes.float()).float().mean() < 0.01


def test_save_reload_round_trip(tmp_path):
    windows = _windows()
    model = hf_compress.compress(make_tiny("llama"), {"method": "gptq", "bits": 4, "group_size": 16,
                                                      "calibration": CAL, "learn_rounding": {"iters": 10}},
                                 calibration=windows, progress=False)
    hf_compress.save_pretrained(model, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config.learn_rounding == model.config.quantization_config.learn_rounding
    assert torch.equal(output_of(again, windows), output_of(model, windows))


def test_same_seed_same_result_other_seed_other_result():
    windows = _windows()

    def run(seed):
        m = hf_compress.compress(make_tiny("llama"), {"method": "rtn", "bits": 3, "group_size": 16, "calibration": CAL,
                                                      "learn_rounding": {"iters": 15, "seed": seed}},
                                 calibration=windows, progress=False)
        return m.model.layers[1].mlp.up_proj.qweight

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_killed_run_resumes_bit_identical(dense4, tmp_path):  # noqa: F811
    """The dense stream (learned rounding's targets) and each block's outcome come back from the checkpoint."""
    common = ["--method", "rtn", "--bits", "3", "--group-size", "16", "--learn-rounding", '{"iters": 8}',
              "--calib", TEXT, "--nsamples", "8", "--seqlen", "32", "--checkpoint-every", "0"]
    stdout, state, _ = resumed_equals_full_run(dense4, tmp_path, common)
    assert "learned rounding: kept in" in stdout  # the time spent in it is printed without -v
    assert set(state["extra"]["learned"]) == {"0", "1"}


@pytest.mark.parametrize("value, message", [
    ({"iters": 0}, "iters must be a positive integer"),
    ({"iters": 2.5}, "iters must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"lr": 0}, "lr must be a number in (0, 1]"),
    ({"lr": float("nan")}, "lr must be a number in (0, 1]"),
    ({"min_clip": 1.5}, "min_clip must be a number in (0, 1]"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"itres": 5}, "Unknown learn_rounding option(s) ['itres']"),
    ("fast", "learn_rounding must be a dict of options"),
])
def test_bad_options_refused(value, message):
    with pytest.raises(ConfigError) as e:
        CompressionConfig(method="rtn", bits=3, learn_rounding=value)
    assert message in str(e.value)


def test_refused_combinations_and_missing_calibration(tmp_path):
    with pytest.raises(ConfigError, match="refines the codes of rtn or gptq, not of method 'hqq'"):
        CompressionConfig(method="hqq", bits=3, learn_rounding=True)
    with pytest.raises(ConfigError, match="refines the codes of rtn or gptq, not of method 'svd'"):
        CompressionConfig(method="svd", ratio=0.3, learn_rounding=True)
    with pytest.raises(ConfigError, match="eora_rank/eora_bits"):
        CompressionConfig(method="gptq", bits=3, eora_rank=4, learn_rounding=True)
    with pytest.raises(ConfigError, match="'rtn with learn_rounding' needs calibration data"):
        hf_compress.compress(make_tiny("llama"), {"method": "rtn", "bits": 3, "learn_rounding": True}, progress=False)
    make_tiny("llama").save_pretrained(tmp_path)  # compress-on-load has no calibration data either
    with pytest.raises(Exception, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressionConfig(
            method="rtn", bits=4, learn_rounding=True))


def test_config_stores_options_only_when_set():
    assert "learn_rounding" not in CompressionConfig(method="rtn", bits=3).to_dict()
    c = CompressionConfig(method="rtn", bits=3, learn_rounding=True)
    assert c.to_dict()["learn_rounding"] == {"iters": 200, "lr": 0.005, "batch_size": 4, "min_clip": 0.5, "seed": 0}
    given = {"iters": 10}
    CompressionConfig(method="rtn", bits=3, learn_rounding=given)
    assert given == {"iters": 10}  # the caller's dict is not completed in place
