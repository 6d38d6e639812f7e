"""The coverage matrix: what hf-compress does on each model family, run on a tiny random config of each, and the
table of docs/coverage.md, which is generated from this module (`render`) and checked against it
(`test_docs_table_is_the_matrix`): a claim in the table is a test here.

Adding a transformers family is one line: an entry in `TEXT` (config kwargs of a causal LM), or in
tests/test_vlm.py's ``VLMS`` / tests/test_moe.py's ``MOE``; then an entry in `EXPECTED` when a feature is
refused on it (every feature not listed is expected to work), and ``python tests/test_coverage_matrix.py`` rewrites
the table.

Features, each a test (`FEATURES`):

* ``data-free``: ``rtn`` 4-bit g16 with the default targets; asserts the share of the linear layers' parameters
  that were compressed (`SHARE`: the table's column) and finite outputs;
* ``calibrated``: ``gptq`` 4-bit g16 on 8 x 32 token windows (text-only calibration for vision-language models);
* ``reload``: save → ``from_pretrained`` through the model's Auto class → the native class, logits equal (0 diff);
* ``kv``: ``generate`` with a ``quant8`` hf-compress KV cache (decoders);
* ``lora``: PEFT LoRA on `target_module_names` (the compressed layers only), a training step, exact merge;
* ``export``: compressed-tensors export loaded back by transformers, logits equal (0 diff).
"""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel

import hf_compress
from hf_compress.errors import HfCompressError
from hf_compress.integrations.peft import target_module_names
from hf_compress.kv import make_cache
from hf_compress.modules import compressed_modules
from hf_compress.summary import layer_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ARCHS as CONFTEST_ARCHS, REPO, VOCAB, make_tiny  # noqa: E402
from test_moe import MOE, tiny_moe  # noqa: E402
from test_vlm import VLMS, tiny_vlm  # noqa: E402

_DECODER = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: causal LMs beyond conftest's: model_type -> config kwargs (None: conftest's `make_tiny` builds it)
TEXT = {
    **{arch: None for arch in CONFTEST_ARCHS if arch != "bert"},
    "qwen3": dict(_DECODER, head_dim=12),
    "gemma3_text": dict(_DECODER, head_dim=12, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(_DECODER),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    "opt": dict(vocab_size=VOCAB, hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=48, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "falcon": dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                   bos_token_id=1, eos_token_id=2),
}
ENCODERS = ["bert"]
#: every architecture of the matrix, in the table's order: text decoders, encoders, vision-language, MoE
MATRIX = [*TEXT, *ENCODERS, *VLMS, *MOE]
FAMILY = {**{a: "text decoder" for a in TEXT}, **{a: "encoder" for a in ENCODERS},
          **{a: "vision-language" for a in VLMS}, **{a: "mixture of experts" for a in MOE}}
FEATURES = {
    "data-free": "compress data-free (`rtn` 4-bit)",
    "calibrated": "compress calibrated (`gptq` 4-bit)",
    "reload": "save → `from_pretrained`, 0 difference",
    "kv": "KV cache in `generate`",
    "lora": "LoRA (PEFT)",
    "export": "compressed-tensors export, 0 difference",
}
#: (arch, feature) -> (status, text) where it does not simply work (every other (arch, feature) is "ok"):
#: * ("refused", the start of hf-compress' error message): not supported, and hf-compress says so;
#: * ("upstream", part of the error another library raises): hf-compress' part works, a stock reader fails;
#: * ("inexact", why): it runs, but the result differs from what the feature promises (0 difference).
_MOE_EXPORT = ("refused", "cannot export the 32 compressed mixture-of-experts expert layers")
EXPECTED = {
    ("bert", "kv"): ("refused", "BertModel is an encoder-only model"),
    ("gpt2", "export"): ("refused", "cannot export 8 layer(s) exactly to compressed-tensors"),
    ("falcon", "export"): ("upstream", "'FalconLinear' object has no attribute 'weight'"),
    ("deepseek_v3", "kv"): ("refused", "deepseek_v3 uses multi-head latent attention (MLA)"),
    **{(arch, "export"): _MOE_EXPORT for arch in MOE if arch != "deepseek_v3"},
    ("deepseek_v3", "export"): ("refused", "cannot export the 16 compressed mixture-of-experts expert layers"),
}
#: what the table says of each status
WHY = {
    ("falcon", "export"): "transformers cannot load a compressed-tensors Falcon (its `_init_weights` reads "
                          "`FalconLinear.weight`, which compressed-tensors replaced by packed tensors)",
    ("gpt2", "export"): "GPT-2's `Conv1D` layers (compressed-tensors quantizes `nn.Linear`); `--format dense` works",
    **{(arch, "export"): "transformers' compressed-tensors loader drops the experts' zero points "
                         "(`CompressedTensorsDequantize`); `--format dense` works (docs/export.md)"
       for arch in MOE},
    ("deepseek_v3", "export"): "the experts, as for the other MoE families; and `q_b_proj` has 24 inputs, not a "
                               "multiple of the group size 16 (partial groups); `--format dense` works",
}
#: the share of the linear layers' parameters (lm_head included) that ``data-free`` compresses, in percent
SHARE = {"llama": 90, "qwen2": 90, "mistral": 90, "gpt2": 92, "qwen3": 90, "gemma3_text": 90, "phi3": 90,
         "gpt_neox": 89, "opt": 89, "falcon": 91, "bert": 94, "gemma3": 61, "llava": 63, "qwen2_5_vl": 47,
         "qwen3_moe": 95, "qwen2_moe": 96, "mixtral": 95, "olmoe": 95, "gpt_oss": 95, "deepseek_v3": 94,
         "granitemoe": 95, "qwen3_next": 95}
RTN = {"method": "rtn", "bits": 4, "group_size": 16}
GPTQ = {"method": "gptq", "bits": 4, "group_size": 16, "calibration": {"nsamples": 8, "seqlen": 32}}


def build(arch: str):
    """A tiny random model of ``arch`` (seeded)."""
    if arch in VLMS:
        return tiny_vlm(arch)
    if arch in MOE:
        return tiny_moe(arch)
    if arch in ENCODERS or TEXT.get(arch) is None:
        return make_tiny(arch)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **TEXT[arch])).eval()


def auto_class(arch: str):
    return AutoModelForImageTextToText if arch in VLMS else AutoModel if arch in ENCODERS else AutoModelForCausalLM


def output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def compressed_share(model) -> int:
    rows = layer_table(model)
    params = {r.name: r.shape[0] * r.shape[1] for r in rows}
    return round(100 * sum(params[r.name] for r in rows if r.kind != "dense") / sum(params.values()))


def _ids():
    return torch.randint(3, VOCAB - 8, (2, 12), generator=torch.Generator().manual_seed(1))


def _calibration():
    return torch.randint(3, VOCAB - 8, (8, 32), generator=torch.Generator().manual_seed(2))


def _compressed(arch):
    model = build(arch)
    hf_compress.compress(model, RTN, progress=False)
    return model


# ----------------------------------------------------------------------------------------------- the features
def data_free(arch, tmp_path):
    model = _compressed(arch)
    assert torch.isfinite(output(model, _ids())).all()
    return compressed_share(model)


def calibrated(arch, tmp_path):
    model = build(arch)
    hf_compress.compress(model, GPTQ, calibration=_calibration(), progress=False)
    assert compressed_modules(model) and torch.isfinite(output(model, _ids())).all()


def reload(arch, tmp_path):
    model = _compressed(arch)
    ref = output(model, _ids())
    model.save_pretrained(tmp_path)
    loaded = auto_class(arch).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert sorted(compressed_modules(loaded)) == sorted(compressed_modules(model))
    assert torch.equal(output(loaded, _ids()), ref)


def kv(arch, tmp_path):
    model = _compressed(arch)
    ids = _ids()[:1]
    cache = make_cache(model, "quant8")
    out = model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache,
                         pad_token_id=model.config.get_text_config().eos_token_id)
    assert out.shape == (1, ids.shape[1] + 4) and cache.get_seq_length() == ids.shape[1] + 3


def lora(arch, tmp_path):
    model = _compressed(arch)
    names = target_module_names(model)
    assert names and set(names) <= set(compressed_modules(model))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=names, init_lora_weights=False))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = _ids()
    out = peft_model(input_ids=ids)
    (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in trainable)
    with torch.no_grad():
        adapted = output(peft_model, ids)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(output(merged, ids), adapted, rtol=1e-5, atol=1e-5)


def export(arch, tmp_path):
    from hf_compress.export import export as export_

    model = _compressed(arch)
    ref = output(model, _ids())
    export_(model, tmp_path / "ct")
    loaded = auto_class(arch).from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    assert torch.equal(output(loaded, _ids()), ref)


RUN = {"data-free": data_free, "calibrated": calibrated, "reload": reload, "kv": kv, "lora": lora, "export": export}


def outcome(arch: str, feature: str, tmp_path) -> tuple[str, object]:
    """("ok", result), ("refused", the message of the hf-compress error that refused it), ("inexact", the failed
    check) or ("upstream", the error another library raised)."""
    try:
        return "ok", RUN[feature](arch, tmp_path)
    except HfCompressError as e:
        return "refused", str(e)
    except AssertionError as e:
        return "inexact", str(e)
    except Exception as e:  # noqa: BLE001 (any other library's error: the cell says which)
        return "upstream", f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("arch", MATRIX)
def test_matrix(arch, feature, tmp_path):
    status, result = outcome(arch, feature, tmp_path)
    expected, text = EXPECTED.get((arch, feature), ("ok", None))
    assert status == expected, f"{arch} / {feature}: documented {expected} ({text}), got {status}: {result}"
    if status == "refused":
        assert str(result).startswith(text), result
    elif status == "upstream":
        assert text in str(result), result
    if feature == "data-free":
        assert result == SHARE[arch], f"{arch}: {result}% of the linear parameters compressed, table says {SHARE[arch]}%"


# ----------------------------------------------------------------------------------------------- the docs table
DOC = os.path.join(REPO, "docs", "coverage.md")
BEGIN, END = "<!-- matrix: generated by tests/test_coverage_matrix.py -->", "<!-- /matrix -->"


def _model_class(arch: str) -> str:
    if arch in VLMS:
        return f"`{AutoModelForImageTextToText._model_mapping[AutoConfig.for_model(arch).__class__].__name__}`"
    if arch in ENCODERS:
        return "`BertModel`"
    return f"`{AutoModelForCausalLM._model_mapping[AutoConfig.for_model(arch).__class__].__name__}`"


def render() -> str:
    """The table: one row per architecture, one column per feature: ok, or refused with the reason's start."""
    head = ["architecture", "class", "family", "compressed share (default targets)", *FEATURES.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in MATRIX:
        cells = [f"`{arch}`", _model_class(arch), FAMILY[arch], f"{SHARE[arch]}%"]
        for feature in FEATURES:
            status, text = EXPECTED.get((arch, feature), ("ok", None))
            why = WHY.get((arch, feature), text)
            cells.append({"ok": "ok", "refused": f"refused: {why}", "upstream": f"fails upstream: {why}",
                          "inexact": f"not exact: {why}"}[status])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([BEGIN, *lines, END])


def _doc_table() -> str:
    text = open(DOC, encoding="utf-8").read()
    match = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), text, re.S)
    assert match, f"{DOC} lacks the generated table between {BEGIN} and {END}"
    return match.group(0)


def test_docs_table_is_the_matrix():
    assert _doc_table() == render(), ("docs/coverage.md's table differs from tests/test_coverage_matrix.py: run "
                                      "`python tests/test_coverage_matrix.py` to rewrite it")


def test_every_architecture_has_its_share_and_every_refusal_names_a_known_cell():
    assert set(SHARE) == set(MATRIX)
    assert all(a in MATRIX and f in FEATURES for a, f in EXPECTED)
    assert {status for status, _ in EXPECTED.values()} <= {"refused", "upstream", "inexact"}


if __name__ == "__main__":  # rewrite the table in docs/coverage.md
    text = open(DOC, encoding="utf-8").read()
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: render(), text, flags=re.S)
    open(DOC, "w", encoding="utf-8").write(new)
    print(f"wrote {DOC}")
