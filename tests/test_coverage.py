"""No silent skips: the coverage report (parameters by kind, compressed and left dense) sums to the model's parameter
count on every architecture of the suite, before and after compression; it is logged by `compress`, printed by the
CLI's ``compress`` and ``info`` and shown in the model card; a large block weight no method can take is named in a
warning."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import hf_compress
from hf_compress import cli, coverage_report
from hf_compress.coverage import KINDS, classify
from hf_compress.hub import model_card

from conftest import ARCHS, make_tiny
from test_moe import MOE, tiny_moe

ALL = sorted(MOE) + ARCHS
RTN4 = {"method": "rtn", "bits": 4}


def _model(arch):
    return tiny_moe(arch) if arch in MOE else make_tiny(arch)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "hf_compress.coverage" and r.levelno == logging.WARNING]


def _kinds(model) -> dict[str, str]:
    return {e.name: e.kind for e in classify(model)}


@pytest.mark.parametrize("arch", ALL)
def test_coverage_sums_to_the_parameter_count_before_and_after_compression(arch, caplog):
    model = _model(arch)
    n = sum(p.numel() for p in model.parameters())  # tied tensors once
    before = coverage_report(model)
    assert set(before.kinds) == set(KINDS)
    assert before.total == n and before.compressed == 0 and before.dense == n
    with caplog.at_level(logging.INFO, logger="hf_compress"):
        hf_compress.compress(model, RTN4, progress=False)
    after = coverage_report(model)
    assert after.total == n  # a compressed layer counts as the dense layer it replaces
    assert sum(k.total for k in after.kinds.values()) == n
    for k in after.kinds.values():
        assert 0 <= k.compressed <= k.total and k.dense == k.total - k.compressed
    assert {k: c.total for k, c in after.kinds.items()} == {k: c.total for k, c in before.kinds.items()}
    if arch in MOE:
        assert after["experts"].total > 0 and after["experts"].fraction == 1.0
        assert after["router"].total > 0 and after["router"].fraction == 0.0
    else:
        assert after["experts"].total == after["router"].total == 0
    assert after["attention"].fraction == 1.0  # default targets: every linear layer of the blocks but routers
    assert after["embeddings/head"].fraction == 0.0
    assert not after.uncompressible and not _warnings(caplog)  # nothing large escapes on the suite's models
    logged = [r.getMessage() for r in caplog.records if r.name == "hf_compress.coverage" and r.levelno == logging.INFO]
    assert len(logged) == 1 and "coverage by kind" in logged[0] and "total" in logged[0]


def test_kinds_follow_the_structure():
    k = _kinds(tiny_moe("qwen2_moe"))
    p = "model.layers.0"
    assert k[f"{p}.self_attn.q_proj.weight"] == k[f"{p}.self_attn.q_proj.bias"] == "attention"
    assert k[f"{p}.mlp.experts.gate_up_proj"] == k[f"{p}.mlp.experts.down_proj"] == "experts"
    assert k[f"{p}.mlp.gate.weight"] == k[f"{p}.mlp.shared_expert_gate.weight"] == "router"
    assert k[f"{p}.mlp.shared_expert.down_proj.weight"] == "shared experts"
    assert k["model.embed_tokens.weight"] == k["lm_head.weight"] == "embeddings/head"
    assert k[f"{p}.input_layernorm.weight"] == k["model.norm.weight"] == "other"
    k = _kinds(tiny_moe("deepseek_v3"))  # first layer dense, shared experts beside the routed ones
    assert k["model.layers.0.mlp.down_proj.weight"] == "dense MLP"
    assert k["model.layers.1.mlp.shared_experts.down_proj.weight"] == "shared experts"
    assert k["model.layers.1.mlp.gate.weight"] == "router"  # DeepseekV3TopkRouter
    assert k["model.layers.1.self_attn.kv_b_proj.weight"] == "attention"
    assert k["model.layers.1.self_attn.kv_a_layernorm.weight"] == "other"
    k = _kinds(tiny_moe("gpt_oss"))
    assert k["model.layers.0.mlp.router.bias"] == "router" and k["model.layers.0.mlp.experts.down_proj_bias"] == "experts"
    assert k["model.layers.0.self_attn.sinks"] == "other"
    k = _kinds(tiny_moe("qwen3_next"))  # linear attention (gated delta net): its linears, its convolution
    assert k["model.layers.0.linear_attn.in_proj_qkvz.weight"] == "attention"
    assert k["model.layers.0.linear_attn.conv1d.weight"] == k["model.layers.0.linear_attn.A_log"] == "other"
    gpt2 = make_tiny("gpt2")  # Conv1D layers; lm_head tied to wte: counted once
    k = _kinds(gpt2)
    assert k["transformer.h.0.attn.c_attn.weight"] == "attention" and k["transformer.h.0.mlp.c_fc.bias"] == "dense MLP"
    assert k["transformer.wte.weight"] == k["transformer.wpe.weight"] == "embeddings/head"
    assert "lm_head.weight" not in k
    k = _kinds(make_tiny("bert"))
    assert k["encoder.layer.0.attention.output.dense.weight"] == "attention"
    assert k["encoder.layer.0.intermediate.dense.weight"] == "dense MLP"
    assert k["pooler.dense.weight"] == "other"  # a linear layer outside the blocks


def test_skipped_experts_are_reported_left_dense_without_a_warning(caplog):
    model = tiny_moe("qwen3_moe")
    n = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.WARNING):
        hf_compress.compress(model, {**RTN4, "skip": ["experts"]}, progress=False)
    c = coverage_report(model)
    assert c.total == n and c["experts"].total > 0 and c["experts"].compressed == 0
    assert c["experts"].dense == c["experts"].total and c["attention"].fraction == 1.0
    assert not c.uncompressible and not _warnings(caplog)  # fused experts can be compressed: no warning


# ----------------------------------------------------------------------------------------------- the warning
class UnknownExperts(nn.Module):
    """Experts in a layout hf-compress does not know (no ``has_gate`` / ``is_transposed``: not a transformers fused
    experts module): one 3-D parameter."""

    def __init__(self, shape):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(*shape) * 0.02)


class MysteryMoE(nn.Module):
    def __init__(self, mlp, shape, name="experts"):
        super().__init__()
        self.dense = mlp
        setattr(self, name, UnknownExperts(shape))
        self.name = name

    def forward(self, x):
        w = getattr(self, self.name).w_in  # [E, I, H]: every expert's first projection, averaged
        return self.dense(x) + torch.einsum("...h,eih->...i", x, w).mean(-1, keepdim=True)


def _with_mystery(shape, name="experts"):
    model = make_tiny("llama")
    for layer in model.model.layers:
        layer.mlp = MysteryMoE(layer.mlp, shape, name)
    return model


def test_a_large_weight_no_method_can_take_is_named_in_a_warning(caplog, ids):
    model = _with_mystery((4, 96, 48))  # 18,432 parameters: ~47 % of each block
    n = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.WARNING):
        hf_compress.compress(model, RTN4, progress=False)
    assert torch.isfinite(model(input_ids=ids).logits).all()
    (message,) = _warnings(caplog)
    assert "model.layers.*.mlp.experts.w_in [4, 96, 48]" in message and "each of 2 blocks" in message
    assert "no hf-compress method can compress" in message and "skip" in message
    c = coverage_report(model)
    assert c.total == n
    assert [w.name for w in c.uncompressible] == [f"model.layers.{i}.mlp.experts.w_in" for i in range(2)]
    assert all(0.4 < w.share < 0.5 and w.shape == (4, 96, 48) for w in c.uncompressible)
    assert c["experts"].total == 2 * 4 * 96 * 48 and c["experts"].compressed == 0  # shown as experts left dense
    assert c["dense MLP"].fraction == 1.0
    assert "large weight left dense (no method can compress it): model.layers.*.mlp.experts.w_in" in c.format_table()
    card = model_card(model, plot=None).text  # the card names it too
    assert "no hf-compress method can compress" in card and "`model.layers.*.mlp.experts.w_in` [4, 96, 48]" in card


def test_the_warning_respects_skip_and_size(caplog):
    with caplog.at_level(logging.WARNING):
        hf_compress.compress(_with_mystery((4, 96, 48)), {**RTN4, "skip": ["experts"]}, progress=False)
        hf_compress.compress(_with_mystery((4, 96, 48)), {**RTN4, "skip": ["model.layers.*.mlp.experts.w_in"]},
                             progress=False)
        hf_compress.compress(_with_mystery((2, 2, 48)), RTN4, progress=False)  # 192 parameters: < 1 % of a block
    assert not _warnings(caplog)
    model = _with_mystery((2, 16, 48), name="lut")  # 1,536 (~4 %), not in an experts module: a dense MLP weight
    with caplog.at_level(logging.WARNING):
        hf_compress.compress(model, RTN4, progress=False)
    (message,) = _warnings(caplog)
    assert "model.layers.*.mlp.lut.w_in [2, 16, 48]" in message
    c = coverage_report(model)
    assert c["dense MLP"].dense == 2 * 2 * 16 * 48 and c["experts"].total == 0


# ----------------------------------------------------------------------------------------------- reported
def test_cli_summary_info_and_card_show_coverage_by_kind(tmp_path, capsys):
    dense = tmp_path / "dense"
    tiny_moe("qwen3_moe").save_pretrained(dense)
    out = tmp_path / "q4"
    assert cli.main(["compress", str(dense), "-o", str(out), "--method", "rtn", "--bits", "4", "--group-size",
                     "16"]) == 0
    summary = capsys.readouterr().out
    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    for text in (summary, info):
        assert "coverage by kind" in text
        rows = {ln.split()[0]: ln for ln in text.splitlines() if ln.split() and ln.split()[0] in
                ("attention", "experts", "router", "total")}
        assert "100.0 %" in rows["experts"] and "100.0 %" in rows["attention"]
        assert rows["router"].split()[-1] == rows["router"].split()[1]  # every router parameter left dense
        assert rows["total"].split()[1] == f"{sum(p.numel() for p in tiny_moe('qwen3_moe').parameters()):,}"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "### Coverage by kind" in card and "| experts | 73,728 | 100.0 % | 0 |" in card
    assert "| router | 768 | 0.0 % | 768 |" in card
    assert "embeddings, norms and tied heads" not in card
    assert "| `experts.gate_up_proj` | 16 |" in card  # the card's layer types: an expert layer is not "3"
