"""Per-layer bit widths under one budget of stored bits per weight (``avg_bits``, ``bit_choices``):
the allocator (`hf_compress.allocation.allocate_bits` / `allocate_layer_formats`), the error it compares widths by
(`hf_compress.methods.quantlib.rounding_error`), the pipeline on tiny Llama models, the checkpoint and the errors."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_compress
from conftest import VOCAB, make_tiny, output_of
from hf_compress.allocation import (_hull_steps, allocate_bits, allocate_layer_formats,
                                   layer_groups, stored_bits)
from hf_compress.errors import ConfigError
from hf_compress.methods.quantlib import fake_quant, grouped, minmax, rounding_error
from hf_compress.modules import QuantLinear

CHOICES = [2, 3, 4, 8]


def _random_problem(seed: int, n_units: int = 4, choices=(2, 3, 4, 8)):
    """Units of different sizes with errors ~ a·4^-b (times noise: not always convex) and costs size·b + overhead."""
    rng = random.Random(seed)
    errors, costs = {}, {}
    for u in range(n_units):
        size, a = rng.choice([10, 20, 30, 70]), rng.uniform(0.1, 5.0)
        errors[f"u{u}"] = {b: a * 4.0 ** -b * rng.uniform(0.5, 1.5) for b in choices}
        costs[f"u{u}"] = {b: size * b + size // 2 for b in choices}
    return errors, costs


def _brute_force(errors, costs, budget):
    """The exact optimum of the multiple-choice knapsack by enumeration: (error, cost) of the best assignment."""
    units = list(errors)
    best = None
    for combo in itertools.product(*(sorted(errors[u]) for u in units)):
        cost = sum(costs[u][b] for u, b in zip(units, combo))
        if cost <= budget:
            err = sum(errors[u][b] for u, b in zip(units, combo))
            if best is None or err < best[0]:
                best = (err, cost)
    return best


def _cost(bits, costs):
    return sum(costs[u][b] for u, b in bits.items())


def _error(bits, errors):
    return sum(errors[u][b] for u, b in bits.items())


@pytest.mark.parametrize("seed", range(6))
def test_allocation_stays_within_budget_and_is_monotone(seed):
    errors, costs = _random_problem(seed)
    low, high = _cost({u: 2 for u in errors}, costs), _cost({u: 8 for u in errors}, costs)
    previous = None
    for budget in range(low, high + 1, 3):
        bits = allocate_bits(errors, costs, budget)
        assert _cost(bits, costs) <= budget
        if previous is not None:  # more budget never gives a unit fewer bits
            assert all(bits[u] >= previous[u] for u in bits), (budget, previous, bits)
            assert _error(bits, errors) <= _error(previous, errors)
        previous = bits
    assert allocate_bits(errors, costs, high) == {u: 8 for u in errors}
    assert allocate_bits(errors, costs, low) == {u: 2 for u in errors}


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_brute_force_optimum_where_it_spends_the_budget(seed):
    """At every budget the allocation spends exactly (the hull breakpoints) it is the exact optimum; at any budget it
    is never better than the optimum (a check of the brute force) and within the next upgrade of it."""
    errors, costs = _random_problem(seed)
    low, high = _cost({u: 2 for u in errors}, costs), _cost({u: 8 for u in errors}, costs)
    exact = 0
    for budget in range(low, high + 1):
        bits = allocate_bits(errors, costs, budget)
        opt_err, _ = _brute_force(errors, costs, budget)
        assert _error(bits, errors) >= opt_err - 1e-12
        if _cost(bits, costs) == budget:
            exact += 1
            assert _error(bits, errors) == pytest.approx(opt_err, rel=1e-12, abs=1e-15)
    assert exact >= len(errors) + 1  # the cheapest assignment and at least one breakpoint per unit were checked


def test_hull_skips_a_width_above_the_chord():
    # 3 bits removes almost nothing more than 2: the hull goes 2 -> 4 directly
    steps = _hull_steps({2: 1.0, 3: 0.99, 4: 0.1, 8: 0.0}, {2: 20, 3: 30, 4: 40, 8: 80})
    assert [b for b, _, _ in steps] == [4, 8]
    assert steps[0][1] == pytest.approx(0.9) and steps[0][2] == 20


def test_units_that_gain_nothing_stay_at_the_smallest_width():
    errors = {"a": {2: 1.0, 4: 0.0}, "b": {2: 0.0, 4: 0.0}}
    costs = {"a": {2: 20, 4: 40}, "b": {2: 20, 4: 40}}
    assert allocate_bits(errors, costs, 1000) == {"a": 4, "b": 2}


def test_stored_bits_is_what_a_quant_linear_stores():
    for (out_f, in_f), bits, group in itertools.product([(8, 48), (5, 100), (96, 48)], CHOICES, [16, 32, 64]):
        layer = QuantLinear(in_f, out_f, bits, group, bias=False)
        assert stored_bits(out_f, in_f, bits, group) == pytest.approx(layer.bits_per_weight * out_f * in_f, rel=1e-12)


def _widths_at(errors, shapes, groups, avg, group_size=16):
    """`allocate_layer_formats` at one group size: the widths."""
    by_format = {n: {(b, group_size): e for b, e in errors[n].items()} for n in shapes}
    return {n: b for n, (b, _) in allocate_layer_formats(by_format, shapes, groups, avg).items()}


def test_layer_allocation_shares_widths_within_groups_and_names_the_feasible_range():
    shapes = {"q": (48, 48), "k": (24, 48), "v": (24, 48), "o": (48, 48)}
    # k alone would like 8 bits, q and v 2 bits: as a group they get one width
    errors = {"q": {b: 1e-3 * 4.0 ** -b for b in CHOICES}, "k": {b: 10.0 * 4.0 ** -b for b in CHOICES},
              "v": {b: 1e-3 * 4.0 ** -b for b in CHOICES}, "o": {b: 1.0 * 4.0 ** -b for b in CHOICES}}
    weights = sum(o * i for o, i in shapes.values())
    for avg in (4.0, 4.5, 5.0, 5.5, 6.5, 10.0):
        bits = _widths_at(errors, shapes, [["q", "k", "v"]], avg)
        assert bits["q"] == bits["k"] == bits["v"]
        assert sum(stored_bits(*shapes[n], b, 16) for n, b in bits.items()) <= avg * weights
    free = _widths_at(errors, shapes, [], 6.0)
    assert free["k"] > free["q"]  # the constraint is what ties them above
    with pytest.raises(ConfigError, match=r"feasible range is \[4.0000, 10.0000\]"):
        _widths_at(errors, shapes, [["q", "k", "v"]], 3.0)
    with pytest.raises(ConfigError, match="not targets"):
        _widths_at(errors, shapes, [["q", "x"]], 5.0)


def _format_problem(groups=(16, 24, 48)):
    shapes = {"q": (48, 48), "k": (24, 48), "v": (24, 48), "o": (48, 48), "down": (48, 96)}
    scale = {"q": 1e-3, "k": 10.0, "v": 1e-3, "o": 1.0, "down": 0.3}
    errors = {n: {(b, g): scale[n] * 4.0 ** -b * (1 + g / 64) for b in (2, 3, 4) for g in layer_groups(i, list(groups))}
              for n, (o, i) in shapes.items()}
    return shapes, errors


def test_layer_groups_are_those_dividing_the_input_width():
    assert layer_groups(576, [64, 128, 192, 576, 1536]) == [64, 192, 576]
    assert layer_groups(1536, [64, 128, 192, 576, 1536]) == [64, 128, 192, 1536]
    assert layer_groups(100, [64, 128]) == [64, 128]  # none divides: all of them (partial last groups)


def test_format_allocation_meets_the_budget_in_stored_bits_and_fused_layers_share_a_format():
    shapes, errors = _format_problem()
    weights = sum(o * i for o, i in shapes.values())
    for avg in (2.7, 2.8, 3.0, 3.3, 3.7, 4.2, 5.0):
        formats = allocate_layer_formats(errors, shapes, [["q", "k", "v"]], avg)
        assert formats["q"] == formats["k"] == formats["v"]
        assert sum(stored_bits(*shapes[n], b, g) for n, (b, g) in formats.items()) <= avg * weights
        assert all(f in errors[n] for n, f in formats.items())  # only formats the layer may get (g24 not for down)
        assert formats == allocate_layer_formats(errors, shapes, [["q", "k", "v"]], avg)  # deterministic
    # the cheapest format of every layer: 2 bits at its largest group
    low = allocate_layer_formats(errors, shapes, [["q", "k", "v"]], 2.0 + 2 * 16 / 48)
    assert low == {"q": (2, 48), "k": (2, 48), "v": (2, 48), "o": (2, 48), "down": (2, 48)}
    with pytest.raises(ConfigError, match=r"bit_choices \[2, 3, 4\] and group sizes \[16, 24, 48\].*feasible range "
                                          r"is \[2.6667, 6.0000\]"):
        allocate_layer_formats(errors, shapes, [["q", "k", "v"]], 2.5)


def test_format_allocation_is_the_brute_force_optimum_where_it_spends_the_budget():
    shapes, errors = _format_problem(groups=(16, 48))
    units = {"q": ["q", "k", "v"], "o": ["o"], "down": ["down"]}
    unit_err = {u: {f: sum(errors[n][f] for n in ns) for f in errors[ns[0]]} for u, ns in units.items()}
    unit_cost = {u: {f: sum(stored_bits(*shapes[n], *f) for n in ns) for f in errors[ns[0]]} for u, ns in units.items()}
    weights = sum(o * i for o, i in shapes.values())
    for avg in [2.67 + 0.05 * k for k in range(70)]:
        formats = allocate_layer_formats(errors, shapes, [["q", "k", "v"]], avg)
        err = sum(errors[n][f] for n, f in formats.items())
        opt_err, _ = _brute_force(unit_err, unit_cost, avg * weights)
        assert err >= opt_err - 1e-15
        spent = sum(stored_bits(*shapes[n], *f) for n, f in formats.items())  # a budget it spends exactly
        assert allocate_layer_formats(errors, shapes, [["q", "k", "v"]], spent / weights) == formats
        assert err == pytest.approx(_brute_force(unit_err, unit_cost, spent)[0], rel=1e-12)


def test_rounding_error_is_the_activation_weighted_error_of_rounding():
    torch.manual_seed(0)
    w = torch.randn(12, 40)
    x = torch.randn(200, 40) * torch.linspace(0.1, 3.0, 40)
    gram = x.T.double() @ x.double() / 200
    previous = None
    for bits in CHOICES:
        wg = grouped(w, 16)
        s, z = minmax(wg, bits, torch.float16, integer_zero=True)
        q = fake_quant(wg, s, z, bits).reshape(12, -1)[:, :40]
        per_token = ((x @ (w - q).T).double().square().sum() / 200).item()  # mean squared output error per token
        err = rounding_error(w, gram, bits, 16)
        assert err == pytest.approx(per_token, rel=1e-6)
        assert rounding_error(w, None, bits, 16) == pytest.approx(float((w - q).double().square().sum()), rel=1e-9)
        if previous is not None:
            assert err < previous
        previous = err


def _calibration(n=8, seqlen=32):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(3))


def _mixed(avg_bits=5.0, method="gptq", choices=None, layers=2, groups=None):
    model = make_tiny("llama", layers=layers)
    cfg = {"method": method, "avg_bits": avg_bits, "group_size": 16, "calibration": {"nsamples": 8, "seqlen": 32}}
    if choices:
        cfg["bit_choices"] = choices
    if groups:
        cfg["group_choices"] = groups
    return hf_compress.compress(model, cfg, calibration=_calibration(), progress=False)


def _widths(model):
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _stored(model):
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.bits_per_weight * m.out_features * m.in_features for m in layers) / sum(
        m.out_features * m.in_features for m in layers)


def test_tiny_llama_meets_the_budget_with_fused_layers_sharing_a_width_and_round_trips(tmp_path):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model = _mixed(5.0)
    widths = _widths(model)
    assert len(widths) == 14 and len(set(widths.values())) > 1  # the budget is spread, not uniform
    for i in range(2):
        p = f"model.layers.{i}."
        assert len({widths[p + f"self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert widths[p + "mlp.gate_proj"] == widths[p + "mlp.up_proj"]
    assert 4.5 < _stored(model) <= 5.0  # g16: 2 bits of scales and zeros per weight on top of the codes
    ref = output_of(model, ids)
    model.save_pretrained(tmp_path / "ck")
    stored = json.loads((tmp_path / "ck" / "config.json").read_text())["base_config"]["quantization_config"]
    assert stored["avg_bits"] == 5.0 and stored["bit_choices"] == CHOICES and stored["bits"] is None
    assert {n: r["bits"] for n, r in stored["modules"].items()} == widths  # the chosen widths, per layer
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert _widths(loaded) == widths
    assert (output_of(loaded, ids) - ref).abs().max() <= 1e-6
    from hf_compress.hub.card import write_model_card

    card = write_model_card(model, tmp_path / "ck").read_text()
    counts = {b: list(widths.values()).count(b) for b in sorted(set(widths.values()))}
    assert ("bit widths per layer (" + ", ".join(f"{n} layers at {b}-bit" for b, n in counts.items())
            + "; chosen from [2, 3, 4, 8] under a budget of 5 bits per weight as stored") in card


def _formats(model):
    return {n: (m.bits, m.group_size) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_group_choices_allocate_formats_shared_by_fused_layers_and_round_trip(tmp_path):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model = _mixed(3.6, choices=[2, 3, 4], groups=[16, 48, 96])
    formats = _formats(model)
    assert len({g for _, g in formats.values()}) > 1  # several group sizes in use
    assert all(m.in_features % m.group_size == 0 for m in model.modules() if isinstance(m, QuantLinear))
    for i in range(2):
        p = f"model.layers.{i}."
        assert len({formats[p + f"self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert formats[p + "mlp.gate_proj"] == formats[p + "mlp.up_proj"]
    assert _stored(model) <= 3.6
    assert _formats(_mixed(3.6, choices=[2, 3, 4], groups=[16, 48, 96])) == formats  # deterministic
    ref = output_of(model, ids)
    model.save_pretrained(tmp_path / "ck")
    stored = json.loads((tmp_path / "ck" / "config.json").read_text())["base_config"]["quantization_config"]
    assert stored["group_choices"] == [16, 48, 96] and stored["group_size"] == 16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert _formats(loaded) == formats
    assert (output_of(loaded, ids) - ref).abs().max() <= 1e-6
    from hf_compress.hub.card import write_model_card

    card = write_model_card(model, tmp_path / "ck").read_text()
    assert "group sizes per layer from [16, 48, 96]" in card and "-bit g48" in card


def test_layer_errors_are_rounding_errors_rescaled_to_the_method_error():
    import math

    from hf_compress.methods import get_method
    from hf_compress.pipelines.sequential import layer_errors
    from hf_compress.calibration import LayerStats

    torch.manual_seed(0)
    w = torch.randn(24, 96)
    x = torch.randn(400, 96) * torch.linspace(0.1, 3.0, 96)
    stats = LayerStats()
    stats.gram, stats.count = (x.T @ x).double(), 400
    config = hf_compress.CompressionConfig(method="gptq", avg_bits=3.2, group_size=16, bit_choices=[2, 3, 4],
                                           group_choices=[16, 32, 48, 64])
    gram = stats.gram / 400
    plain = layer_errors(get_method("rtn")(), w, stats, config, torch.float16)
    assert set(plain) == {(b, g) for b in (2, 3, 4) for g in (16, 32, 48)}  # 64 does not divide 96
    assert all(plain[(b, g)] == pytest.approx(rounding_error(w, gram, b, g), rel=1e-9) for b, g in plain)
    assert layer_errors(get_method("rtn")(), w, stats, config, torch.float16, calibrate=False) == plain
    own = layer_errors(get_method("gptq")(), w, stats, config, torch.float16)

    def gptq_error(b, g):
        e = w - get_method("gptq")().quantize(w, b, g, stats, torch.float16).dequantize()
        return float(((e @ gram.float()) * e).sum())

    # reference formats: the widths nearest 3.2 (3 and 4) x the smallest and largest group (16, 48): the method's error
    for f in [(3, 16), (3, 48), (4, 16), (4, 48)]:
        assert own[f] == pytest.approx(gptq_error(*f), rel=1e-5)
    ratio = {f: own[f] / plain[f] for f in plain}
    assert ratio[(3, 16)] < 0.9
    t = math.log(32 / 16) / math.log(48 / 16)  # g32: the log-ratio interpolated in log group size
    assert math.log(ratio[(3, 32)]) == pytest.approx((1 - t) * math.log(ratio[(3, 16)]) + t * math.log(ratio[(3, 48)]))
    assert all(ratio[(2, g)] == pytest.approx(ratio[(3, g)]) for g in (16, 32, 48))  # below the references: clamped


def test_more_budget_never_gives_a_layer_fewer_bits():
    low, high = _widths(_mixed(4.5)), _widths(_mixed(5.5))
    assert all(high[n] >= low[n] for n in low) and high != low


def test_choices_restrict_the_widths_and_rtn_works_too():
    model = _mixed(4.5, method="rtn", choices=[2, 4])
    assert set(_widths(model).values()) <= {2, 4}
    assert _stored(model) <= 4.5


@pytest.mark.parametrize("kwargs", [{"avg_bits": 5.0}, {"avg_bits": 3.6, "choices": [2, 3, 4], "groups": [16, 48, 96]}])
def test_mixed_model_exports_to_compressed_tensors(tmp_path, kwargs):
    from hf_compress.export import export

    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model = _mixed(**kwargs)
    ref = output_of(model, ids)
    export(model, tmp_path / "ct")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["group_size"]) for g in q["config_groups"].values()) == \
        sorted(set(_formats(model).values()))
    # the stored codes, scales and zero points are ours exactly: unpacked by compressed-tensors' own helpers and
    # dequantized in fp32 they give our weights bit for bit
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    stored = {k: v for f in sorted((tmp_path / "ct").glob("*.safetensors")) for k, v in load_file(f).items()}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            scale, shape = stored[n + ".weight_scale"].float(), stored[n + ".weight_shape"]
            zero = unpack_from_int32(stored[n + ".weight_zero_point"], m.bits, (*shape[:-1], scale.shape[-1]),
                                     packed_dim=0)
            codes = unpack_from_int32(stored[n + ".weight_packed"], m.bits, shape)
            groups = (codes.float() - zero.float().repeat_interleave(m.group_size, 1)[:, :m.in_features])
            assert torch.equal(groups * scale.repeat_interleave(m.group_size, 1)[:, :m.in_features], m.dequantized())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    # a layer whose one group spans its whole 96-wide row (3-bit g96 down_proj here) comes back up to 2.6e-4 off on
    # these outputs. The stored tensors are exact (above); compressed-tensors' `dequantize` computes in the dtype of
    # the fp16 scales (weights up to 2.7e-5 off on these layers, measured by hand); why its loader takes that path for
    # this layer alone was not traced
    whole_row = any(m.group_size == m.in_features > 48 for m in model.modules() if isinstance(m, QuantLinear))
    assert (output_of(loaded, ids) - ref).abs().max() <= (1e-3 if whole_row else 1e-6)


@pytest.mark.parametrize("cfg, match", [
    ({"method": "gptq", "bits": 3, "avg_bits": 3.0}, "either bits .* or avg_bits"),
    ({"method": "gptq", "bits": 3, "bit_choices": [2, 4]}, "bit_choices .* give it with avg_bits"),
    ({"method": "gptq", "avg_bits": 3.0, "bit_choices": [2, 5]}, "bit_choices must be"),
    ({"method": "gptq", "avg_bits": 3.0, "bit_choices": []}, "bit_choices must be"),
    ({"method": "gptq", "bits": 3, "group_choices": [64, 128]}, "group_choices .* give it with avg_bits"),
    ({"method": "gptq", "avg_bits": 3.0, "group_choices": [64, 0]}, "group_choices must be"),
    ({"method": "gptq", "avg_bits": 3.0, "group_choices": "64"}, "group_choices must be"),
    ({"method": "gptq", "avg_bits": -1}, "avg_bits must be a positive number"),
    ({"method": "gptq", "avg_bits": "3"}, "avg_bits must be a positive number"),
    ({"method": "svd", "ratio": 0.3, "avg_bits": 3.0}, "use it with rtn, hqq or gptq"),
    ({"method": "rtn", "avg_bits": 3.0, "expert_bits": [2, 3]}, "drop expert_bits"),
    ({"method": "gptq"}, "give bits .* or avg_bits"),
])
def test_bad_configs_are_refused(cfg, match):
    with pytest.raises(ConfigError, match=match):
        hf_compress.CompressionConfig(**cfg)


def test_infeasible_budget_and_missing_calibration_are_refused():
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="needs calibration data"):
        hf_compress.compress(model, {"method": "rtn", "avg_bits": 5.0, "group_size": 16}, progress=False)
    with pytest.raises(ConfigError, match=r"avg_bits 3 cannot be met .* feasible range is \[4.0000, 10.0000\]"):
        hf_compress.compress(model, {"method": "rtn", "avg_bits": 3.0, "group_size": 16,
                                     "calibration": {"nsamples": 8, "seqlen": 32}},
                             calibration=_calibration(), progress=False)
    assert not _widths(model)  # nothing was replaced
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_flags_give_the_config():
    from hf_compress import cli

    args = cli.build_parser().parse_args(["compress", "m", "-o", "out", "--method", "gptq", "--avg-bits", "3",
                                          "--bit-choices", "4", "2", "--group-size", "64", "--calib", "f.txt"])
    config = cli._config_from_args(args)
    assert (config.avg_bits, config.bit_choices, config.bits, config.group_size) == (3.0, [2, 4], None, 64)
    assert config.group_choices == [64]
    args = cli.build_parser().parse_args(["compress", "m", "-o", "out", "--method", "gptq", "--avg-bits", "3",
                                          "--group-choices", "192", "64", "--group-size", "64", "--calib", "f.txt"])
    assert cli._config_from_args(args).group_choices == [64, 192]


def test_compress_on_load_is_refused(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(Exception, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=hf_compress.CompressionConfig(
            method="rtn", avg_bits=5.0, group_size=16))


@pytest.mark.parametrize("extra", [{}, {"avg_bits": 3.6, "bit_choices": [2, 3, 4], "group_choices": [16, 48, 96]}])
def test_interrupted_run_resumes_with_the_same_widths(tmp_path, monkeypatch, extra):
    """Killed (an exception) in block 1 once block 0 is committed: the resumed run takes the widths (and group
    sizes) from the checkpoint (no second sensitivity pass) and ends bit-identical to an uninterrupted run."""
    from hf_compress.pipelines import sequential

    cfg = {"method": "gptq", "avg_bits": 5.0, "group_size": 16, "calibration": {"nsamples": 8, "seqlen": 32}, **extra}
    full = hf_compress.compress(make_tiny("llama", layers=3), dict(cfg), calibration=_calibration(), progress=False)
    ckpt = tmp_path / "ckpt"
    model = make_tiny("llama", layers=3)

    def stop(module, args):
        state = ckpt / "state.json"
        if state.is_file() and json.loads(state.read_text())["done"] >= 1:
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        hf_compress.compress(model, dict(cfg), calibration=_calibration(), progress=False, checkpoint_dir=ckpt,
                             checkpoint_every=0)
    handle.remove()
    assert json.loads((ckpt / "state.json").read_text())["done"] == 1

    def no_sensitivity(*args, **kwargs):
        raise AssertionError("the widths are in the checkpoint")

    monkeypatch.setattr(sequential, "output_sensitivity", no_sensitivity)
    resumed = hf_compress.compress(make_tiny("llama", layers=3), dict(cfg), calibration=_calibration(),
                                   progress=False, checkpoint_dir=ckpt)
    assert _formats(resumed) == _formats(full) and len(set(_widths(full).values())) > 1
    if extra:
        assert len({g for _, g in _formats(full).values()}) > 1
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_model_exports_to_gguf(tmp_path, tiny_tokenizer, monkeypatch):
    """Each layer is exported by its own width (here no layer has a GGUF grid at group 16: every one is written
    dense, and the file computes what the model does, compared with the fp32 reference kernels)."""
    from hf_compress.export import export
    from hf_compress.kernels import dispatch

    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    dispatch.kernel_mode.cache_clear()

    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model = _mixed(5.0)
    out = tmp_path / "m.gguf"
    result = export(model, out, format="gguf", tokenizer=tiny_tokenizer)
    rows = {r.source.removesuffix(".weight"): r for r in result.tensors}
    assert all(rows[n].kind == "dense" for n in _widths(model))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    assert (output_of(loaded, ids) - output_of(model, ids)).abs().max() <= 1e-5
    monkeypatch.undo()
    dispatch.kernel_mode.cache_clear()


# ------------------------------------------------------------------------------------- measured sensitivity
def _spy(monkeypatch):
    """Records every `output_divergence` call of the pipeline (the target weights at that moment and its result)
    and the errors handed to the allocator (with the target weights at that moment)."""
    from hf_compress.pipelines import sequential

    seen = {"calls": [], "errors": None}
    divergence, allocate = sequential.output_divergence, sequential.allocate_layer_formats

    def spy_divergence(model, samples, reference):
        value = divergence(model, samples, reference)
        weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and n.split(".")[-1].endswith("proj")}
        seen["calls"].append((weights, value, [s["input_ids"].clone() for s in samples]))
        return value

    def spy_allocate(errors, shapes, groups, *args, **kwargs):
        seen["errors"], seen["groups"] = {n: dict(e) for n, e in errors.items()}, [list(g) for g in groups]
        return allocate(errors, shapes, groups, *args, **kwargs)

    monkeypatch.setattr(sequential, "output_divergence", spy_divergence)
    monkeypatch.setattr(sequential, "allocate_layer_formats", spy_allocate)
    return seen


def test_measured_sensitivity_is_the_kl_with_one_unit_quantized_alone(monkeypatch):
    """``bits_sensitivity="measured"``: every unit (q/k/v, o, gate/up, down) is quantized alone in its cheapest
    format (rtn 2-bit, the largest group) while the rest stays dense; the measurement is the mean KL of the dense
    model's next-token distributions to that model's, on the first two calibration windows (recomputed here by
    hand); each unit's errors are scaled so that in that format their sum is the measurement, their shape across
    formats unchanged; the weights are dense again afterwards."""
    from hf_compress.methods import get_method

    cfg = {"method": "rtn", "avg_bits": 3.6, "bit_choices": [2, 3, 4], "group_size": 16, "group_choices": [16, 48],
           "calibration": {"nsamples": 8, "seqlen": 32}}
    dense = make_tiny("llama")
    originals = {n: m.weight.detach().clone() for n, m in dense.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith("proj")}
    gradient = _spy(monkeypatch)
    hf_compress.compress(make_tiny("llama"), dict(cfg), calibration=_calibration(), progress=False)
    monkeypatch.undo()
    seen = _spy(monkeypatch)
    model = hf_compress.compress(make_tiny("llama"), {**cfg, "bits_sensitivity": "measured"},
                                 calibration=_calibration(), progress=False)
    assert model.config.quantization_config.to_dict()["bits_sensitivity"] == "measured"
    units = seen["groups"]
    assert len(units) == 8 and len(seen["calls"]) == 8  # 4 units per block, one measurement each
    rtn = get_method("rtn")()
    for unit, (weights, value, windows) in zip(units, seen["calls"]):
        assert len(windows) == 2 and all(w.shape == (1, 32) for w in windows)
        changed = {n for n, w in weights.items() if not torch.equal(w, originals[n])}
        assert changed == set(unit)  # this unit alone; the previous one was restored
        check = make_tiny("llama")
        for n in unit:
            expected = rtn.quantize(originals[n], 2, 48, None, torch.float16).dequantize()[:, :originals[n].shape[1]]
            torch.testing.assert_close(weights[n], expected, rtol=0, atol=1e-6)
            check.get_submodule(n).weight.data.copy_(weights[n])
        kl = [torch.nn.functional.kl_div(torch.log_softmax(output_of(check, w).double(), -1),
                                         torch.log_softmax(output_of(dense, w).double(), -1),
                                         log_target=True, reduction="sum") / w.shape[1] for w in windows]
        assert value > 0 and value == pytest.approx(float(sum(kl)) / 2, rel=1e-6)
        assert sum(seen["errors"][n][(2, 48)] for n in unit) == pytest.approx(value, rel=1e-9)
        for n in unit:  # the shape across formats is the estimate's (gradient mode: one factor per layer)
            for f, e in seen["errors"][n].items():
                assert e / seen["errors"][n][(2, 48)] == pytest.approx(
                    gradient["errors"][n][f] / gradient["errors"][n][(2, 48)], rel=1e-9)


def test_measured_sensitivity_options_are_checked_and_reach_the_cli():
    from hf_compress import cli

    with pytest.raises(ConfigError, match="bits_sensitivity .* give it with avg_bits"):
        hf_compress.CompressionConfig(method="gptq", bits=3, bits_sensitivity="measured")
    with pytest.raises(ConfigError, match=r"bits_sensitivity must be one of \['gradient', 'measured'\]"):
        hf_compress.CompressionConfig(method="gptq", avg_bits=3.0, bits_sensitivity="kl")
    config = hf_compress.CompressionConfig(method="gptq", avg_bits=3.0, group_size=64)
    assert "bits_sensitivity" not in config.to_dict()  # the default is not written
    args = cli.build_parser().parse_args(["compress", "m", "-o", "out", "--method", "gptq", "--avg-bits", "3",
                                          "--bits-sensitivity", "measured", "--calib", "f.txt"])
    assert cli._config_from_args(args).bits_sensitivity == "measured"


def test_an_encoder_is_measured_by_its_hidden_states_and_left_as_it_was():
    """Without logits (``BertModel``) the divergence is half the mean squared change of the last hidden state;
    an encoder compressed with ``avg_bits`` and measured sensitivity meets the budget."""
    from hf_compress.gradients import model_output, output_divergence

    model = make_tiny("bert")
    sample = {"input_ids": _calibration(1, 16)}
    reference = [model_output(model, sample)]
    assert reference[0][1] is False
    before = reference[0][0].clone()
    assert output_divergence(model, [sample], reference) == 0.0
    layer = model.encoder.layer[0].output.dense
    with torch.no_grad():
        layer.weight.mul_(0.5)
    now = output_of(model, sample["input_ids"])
    assert output_divergence(model, [sample], reference) == pytest.approx(
        0.5 * float((now.double() - before.double()).pow(2).mean()), rel=1e-9)
    compressed = hf_compress.compress(make_tiny("bert"), {"method": "rtn", "avg_bits": 5.0, "bit_choices": [2, 3, 4],
                                                          "group_size": 16, "bits_sensitivity": "measured",
                                                          "calibration": {"nsamples": 8, "seqlen": 32}},
                                      calibration=_calibration(), progress=False)
    assert 4.5 < _stored(compressed) <= 5.0 and len({m.bits for m in compressed.modules()
                                                     if isinstance(m, QuantLinear)}) > 1


def test_measured_sensitivity_refuses_offloaded_layers(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk",
                  "model.norm": "cpu", "lm_head": "cpu"}
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                               offload_folder=str(tmp_path / "offload"))
    with pytest.raises(ConfigError, match=r"bits_sensitivity='measured' .* 14 targeted layers are offloaded"):
        hf_compress.compress(off, {"method": "rtn", "avg_bits": 5.0, "group_size": 16, "bits_sensitivity": "measured",
                                   "calibration": {"nsamples": 8, "seqlen": 32}}, calibration=_calibration(),
                             progress=False)
    assert not _widths(off)
