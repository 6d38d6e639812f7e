"""``method="best"`` (hf_compress/recipes.py): the recipe expands into concrete fields the caller can read and the
checkpoint stores, the caller's explicit choices win, and compressing with it equals compressing with the expanded
options bit for bit; where the model cannot take the rotation (not a Llama-layout decoder) it is left out with a
warning, and the rest of the recipe runs."""

import logging

import pytest
import torch

import hf_compress
from conftest import VOCAB, make_tiny, output_of
from hf_compress import CompressionConfig
from hf_compress.cli import _config_from_args, build_parser
from hf_compress.errors import ConfigError
from hf_compress.recipes import RECIPES


SEQ = {"nsamples": 8, "seqlen": 24}


def _calib(n=8, seqlen=24):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(3))


def test_best_expands_into_concrete_fields_and_round_trips():
    c = CompressionConfig(method="best", bits=3, group_size=64)
    method, sets, options = RECIPES["best"]
    assert c.method == method == "gptq" and c.recipe == "best"
    assert c.rotate == sets["rotate"] == "hadamard" and c.method_kwargs == options == {"grid": "mse-act"}
    d = c.to_dict()
    assert d["method"] == "gptq" and d["recipe"] == "best"
    again = CompressionConfig.from_dict(d)
    assert again == c and again.method == "gptq" and again.rotate == "hadamard"
    assert "recipe" not in CompressionConfig(method="gptq", bits=3).to_dict()  # stored only when used


def test_explicit_choices_win_over_the_recipe():
    c = CompressionConfig(method="best", bits=4, group_size=128, rotate="orthogonal",
                          method_kwargs={"grid": "minmax", "damp": 0.02})
    assert c.rotate == "orthogonal" and c.method_kwargs == {"grid": "minmax", "damp": 0.02}
    assert c.recipe_filled == ()


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="best"), "give bits"),
    (dict(method="best", bits=3, ratio=0.3), "ratio/rank belong to low-rank methods"),
    (dict(method="gptq", bits=3, recipe="fastest"), "recipe must be one of"),
])
def test_bad_recipe_input_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig(**kwargs)


def test_best_equals_the_expanded_options_bit_for_bit(ids):
    a, b = make_tiny("llama"), make_tiny("llama")
    hf_compress.compress(a, {"method": "best", "bits": 3, "group_size": 16, "calibration": SEQ}, calibration=_calib(), progress=False)
    hf_compress.compress(b, {"method": "gptq", "bits": 3, "group_size": 16, "rotate": "hadamard",
                             "method_kwargs": {"grid": "mse-act"}, "calibration": SEQ}, calibration=_calib(), progress=False)
    assert torch.equal(output_of(a, ids), output_of(b, ids))
    stored = a.config.quantization_config
    assert stored.recipe == "best" and stored.rotate == "hadamard" and stored.method == "gptq"


def test_rotation_left_out_where_the_model_cannot_take_it(ids, caplog):
    a, b = make_tiny("gpt2"), make_tiny("gpt2")
    with caplog.at_level(logging.WARNING, logger="hf_compress.recipes"):
        hf_compress.compress(a, {"method": "best", "bits": 4, "group_size": 16, "calibration": SEQ},
                             calibration=_calib(), progress=False)
    assert "residual-stream rotation is left out for GPT2LMHeadModel" in caplog.text
    hf_compress.compress(b, {"method": "gptq", "bits": 4, "group_size": 16, "method_kwargs": {"grid": "mse-act"},
                             "calibration": SEQ}, calibration=_calib(), progress=False)
    assert torch.equal(output_of(a, ids), output_of(b, ids))
    stored = a.config.quantization_config
    assert stored.recipe == "best" and stored.rotate is None  # the checkpoint says what ran


def test_rotation_left_out_where_the_head_is_tied_unless_asked(ids, caplog):
    """A rotation unties a tied head (one more vocab x hidden matrix stored): the recipe stays at the bytes of plain
    bits/group_size by leaving it out; an explicit rotate= still rotates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import _decoder_kwargs

    def tied():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**_decoder_kwargs(2), tie_word_embeddings=True)).eval()

    a, b, c = tied(), tied(), tied()
    assert a.get_output_embeddings().weight is a.get_input_embeddings().weight
    with caplog.at_level(logging.INFO, logger="hf_compress.recipes"):
        hf_compress.compress(a, {"method": "best", "bits": 3, "group_size": 16, "calibration": SEQ},
                             calibration=_calib(), progress=False)
    assert "head is tied to the input embeddings" in caplog.text
    hf_compress.compress(b, {"method": "gptq", "bits": 3, "group_size": 16, "method_kwargs": {"grid": "mse-act"},
                             "calibration": SEQ}, calibration=_calib(), progress=False)
    assert torch.equal(output_of(a, ids), output_of(b, ids))
    assert a.config.quantization_config.rotate is None and a.get_output_embeddings().weight is a.get_input_embeddings().weight
    hf_compress.compress(c, {"method": "best", "bits": 3, "group_size": 16, "rotate": "hadamard",
                             "calibration": SEQ}, calibration=_calib(), progress=False)
    assert c.config.quantization_config.rotate == "hadamard"


def test_an_explicit_rotation_is_not_dropped_silently():
    with pytest.raises(ConfigError, match="Llama|layout|missing|lacks"):
        hf_compress.compress(make_tiny("gpt2"), {"method": "best", "bits": 4, "group_size": 16,
                                                 "rotate": "hadamard", "calibration": SEQ}, calibration=_calib(),
                             progress=False)


def test_cli_method_best():
    args = build_parser().parse_args(["compress", "m", "-o", "out", "--method", "best", "--bits", "3", "--group-size",
                                      "64", "--calib", "x.txt"])
    c = _config_from_args(args)
    assert (c.method, c.recipe, c.rotate, c.bits, c.group_size) == ("gptq", "best", "hadamard", 3, 64)
    assert c.method_kwargs == {"grid": "mse-act"}
