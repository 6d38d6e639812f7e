"""Export an hf-compress Llama-architecture model to one GGUF file that llama.cpp runs (docs/export.md, "GGUF").

Exact mappings. Our packed layout is ``W[o, k] = (q[o, k] − z[o, k // g]) · s[o, k // g]``
(`kernels.reference.weights`); a GGUF block covers 32 consecutive input columns of one row with one fp16 scale ``d`` (and for Q4_1 one fp16
minimum ``m``). When 32 divides both the group size g and in_features, every block lies inside one of our groups,
so each block takes its group's (s, z) and our codes are copied unchanged:

* Q4_1 (w = d·q + m): any `QuantLinear` of 2, 3 or 4 bits: d = s, m = fp16(−z·s) — the only rounding is
  that of m, |Δw| ≤ 2⁻¹¹·|z·s| (half an fp16 ulp; ≤ 2⁻²⁵ in fp16's subnormal range). Integer or float zero
  points alike.
* Q4_0 (w = d·(q − 8)): 2/3/4-bit with z = 8 everywhere: d = s, exact for fp16 scales.
* Q8_0 (w = d·q′, q′ int8): 8-bit with integer zero points and every q − z in [−128, 127] (a symmetric grid,
  z = 128): q′ = q − z, d = s, exact for fp16 scales.

Everything else — other group sizes, 8-bit asymmetric grids, EoRA factors, `LowRankLinear`, `QuantLowRankLinear` —
is multiplied out (W = dequant(Q) + U·V, or U·V) and written dense (F32, or F16 with ``dtype="float16"``) or, with
``requantize``, re-quantized by the gguf package's own quantizer (`gguf.quants.quantize`, e.g. Q8_0).

llama.cpp rotates q/k with the "NeoX-free" pairing of adjacent rows, so its converter permutes the rows of
attn_q / attn_k within each head: row (h, i, j) ← HF row (h, j, i) for [n_head, 2, head_dim/2]. Whole rows move,
so blocks (along the input dimension) stay exact. Every tensor is checked against `gguf.quants.dequantize` of the
bytes written; the per-tensor max |Δw| / max |w| is in the report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExportError
from .kernels import unpack
from .modules import LowRankLinear, QuantLinear, QuantLowRankLinear, compressed_modules

BLOCK = 32
EXACT, REQUANT, DENSE = "exact", "re-quantized", "dense"
REQUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
ARCHITECTURES = ("LlamaForCausalLM",)
#: llama.cpp's pre-tokenizer names by the hash of the token ids of its check text (convert_hf_to_gguf.py)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
          '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}


@dataclass
class GGUFTensor:
    """One row of the export report: ``rel_err`` = max |w_gguf − w_ours| / max |w_ours| (w_gguf dequantized by
    the gguf package from the bytes written)."""
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    source: str  # our state-dict / module name
    kind: str  # exact / re-quantized / dense
    type: str  # GGML type, e.g. Q4_1
    rel_err: float
    why: str = ""  # why a compressed layer is not exact


def exact_type(m: nn.Module) -> tuple[str | None, str]:
    """(GGML type that holds ``m``'s codes exactly, or None; why not)."""
    if not isinstance(m, QuantLinear):
        return None, "low rank" if isinstance(m, (LowRankLinear, QuantLowRankLinear)) else type(m).__name__
    if m.rank:
        return None, f"EoRA rank {m.rank}"
    if m.group_size % BLOCK or m.in_features % BLOCK:
        return None, f"group {m.group_size} / in_features {m.in_features} not multiples of {BLOCK}"
    z = m.zeros.float()
    if m.bits <= 4:
        return ("Q4_0" if bool((z == 8).all()) else "Q4_1"), ""
    if not bool((z == z.round()).all()):
        return None, "8-bit with float zero points"
    q = unpack(m.qweight, m.bits, m.in_features) - _per_block(z, m.group_size, m.in_features).repeat_interleave(
        BLOCK, 1).long()
    if int(q.min()) < -128 or int(q.max()) > 127:
        return None, "8-bit asymmetric grid (q − z outside int8)"
    return "Q8_0", ""


def _per_block(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[out, groups] -> [out, in_features / 32]: each 32-column block's group value."""
    return t.float().repeat_interleave(group_size // BLOCK, 1)[:, : in_features // BLOCK]


def exact_blocks(m: QuantLinear, qtype: str) -> np.ndarray:
    """The GGML blocks [out, bytes per row] of ``m``'s codes (module docstring: the maths; llama.cpp's block
    structs: Q4_0 {fp16 d; u8 qs[16]}, Q4_1 {fp16 d, m; u8 qs[16]}, Q8_0 {fp16 d; i8 qs[32]}; a 4-bit byte j
    holds code j in its low nibble and code j + 16 in its high nibble)."""
    out, n = m.out_features, m.in_features
    q = unpack(m.qweight, m.bits, n).view(out, n // BLOCK, BLOCK)
    s = _per_block(m.scales, m.group_size, n)
    z = _per_block(m.zeros, m.group_size, n)
    parts = [s.half()]
    if qtype == "Q8_0":
        qs = (q - z.long()[..., None]).to(torch.int8).view(torch.uint8)
    else:
        if qtype == "Q4_1":
            parts.append((-z * s).half())  # one rounding: z·s is exact in fp32 (≤ 11 + 11 significant bits)
        qs = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
    cols = [p.contiguous().view(torch.uint8).view(out, -1, 2) for p in parts] + [qs]
    return torch.cat(cols, dim=-1).reshape(out, -1).numpy()


def _qk_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for attn_q / attn_k: GGUF row r holds HF row perm[r]."""
    d = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, 2, d).transpose(1, 2).reshape(-1)


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max()) if ref.size else 0.0
    return diff / scale if scale else diff


def _config_checks(model) -> dict:
    """The llama.* metadata of ``model``; `ExportError` for what llama.cpp's llama architecture does not hold."""
    from .modules.experts import CompressedExperts, is_fused_experts

    cfg = model.config
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    experts = [n for n, m in model.named_modules() if isinstance(m, CompressedExperts) or is_fused_experts(m)]
    if experts:
        raise ExportError(
            f"GGUF export does not write mixture-of-experts models: this {arch} has {len(experts)} experts modules "
            f"(e.g. {experts[0]}), and the export writes llama.cpp's dense llama tensors only, not its per-layer "
            "expert tensors (ffn_gate_inp, ffn_gate_exps / ffn_up_exps / ffn_down_exps); export --format dense and "
            "use llama.cpp's convert_hf_to_gguf.py")
    if type(model).__name__ not in ARCHITECTURES or getattr(cfg, "model_type", None) != "llama":
        raise ExportError(f"GGUF export supports {', '.join(ARCHITECTURES)} only; this model is {arch} "
                          f"(model_type {getattr(cfg, 'model_type', None)!r}); export --format dense and use "
                          "llama.cpp's convert_hf_to_gguf.py")
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"GGUF export writes plain RoPE only; this model has rope_type {rope.get('rope_type')!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ExportError("GGUF export does not write attention / MLP biases (attention_bias or mlp_bias is set)")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
            "head_count": heads, "head_count_kv": getattr(cfg, "num_key_value_heads", None) or heads,
            "rope_freq_base": float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
            "rms_eps": float(cfg.rms_norm_eps), "head_dim": head_dim, "vocab_size": cfg.vocab_size}


def _tokenizer_from_gguf(path: str | os.PathLike, vocab_size: int) -> list[tuple]:
    """(key, value, type, subtype) of every tokenizer.* key of a GGUF file."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    keys = [k for k in fields if k.startswith("tokenizer.")]
    if "tokenizer.ggml.tokens" not in fields:
        raise ExportError(f"{path} has no tokenizer (no tokenizer.ggml.tokens)")
    n = len(fields["tokenizer.ggml.tokens"].data)
    if n != vocab_size:
        raise ExportError(f"the tokenizer of {path} has {n} tokens, the model's vocabulary {vocab_size}")
    out = []
    for k in keys:
        f = fields[k]
        t = gguf.GGUFValueType(f.types[0])
        out.append((k, f.contents(), t, gguf.GGUFValueType(f.types[1]) if t == gguf.GGUFValueType.ARRAY else None))
    return out


def _tokenizer_from_hf(tokenizer, vocab_size: int) -> tuple[list[tuple], str]:
    """A gpt2-BPE vocabulary as llama.cpp's converter builds it (``get_vocab_base``): ids without a token become
    ``[PAD{i}]`` (UNUSED); added tokens are CONTROL when special, else USER_DEFINED; the pre-tokenizer is named
    by the hash of the token ids of llama.cpp's check text ("default" when unknown, with a note)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    if state.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ExportError(f"the tokenizer ({type(tokenizer).__name__}) is not a byte-level BPE; pass the GGUF file "
                          "to copy a tokenizer from (gguf_tokenizer=, --gguf-tokenizer)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())}, the model's vocabulary {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            special = token in added and (getattr(decoder.get(i), "special", False)
                                          or (token.startswith("<|") and token.endswith("|>")))
            types.append(gguf.TokenType.CONTROL if special else
                         gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
            tokens.append(token)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(chkhsh, "default")
    S, A, U32, B = (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32,
                    gguf.GGUFValueType.BOOL)
    kv = [("tokenizer.ggml.model", "gpt2", S, None), ("tokenizer.ggml.pre", pre, S, None),
          ("tokenizer.ggml.tokens", tokens, A, S), ("tokenizer.ggml.token_type", [int(t) for t in types], A,
                                                    gguf.GGUFValueType.INT32),
          ("tokenizer.ggml.merges", merges, A, S)]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        if getattr(tokenizer, attr, None) is not None:
            kv.append((f"tokenizer.ggml.{key}_token_id", int(getattr(tokenizer, attr)), U32, None))
    ids = tokenizer("a")["input_ids"]
    kv.append(("tokenizer.ggml.add_bos_token", bool(ids) and ids[0] == tokenizer.bos_token_id, B, None))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        kv.append(("tokenizer.chat_template", tokenizer.chat_template, S, None))
    note = "" if pre != "default" else (f"the tokenizer's pre-tokenizer is not one llama.cpp's converter knows "
                                        f"(hash {chkhsh[:12]}…): written as 'default'")
    return kv, note


def _linear_tensor(m: nn.Module, requantize: str | None, dense: str) -> tuple[np.ndarray, str, str, str, float]:
    """(data [out, …], GGML type, kind, why, rel_err) of a compressed layer (`exact_type`, else multiplied out)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    qtype, why = exact_type(m)
    if qtype:
        data = exact_blocks(m, qtype)
        return data, qtype, EXACT, "", _rel(m.dequantized().numpy(), dequantize(data, Q[qtype]))
    w = m.to_dense().weight.detach().float().numpy()
    if requantize and w.shape[1] % BLOCK == 0:
        data = quantize(w, Q[requantize])
        return data, requantize, REQUANT, why, _rel(w, dequantize(data, Q[requantize]))
    data = w.astype(np.float16 if dense == "F16" else np.float32)
    return data, dense, DENSE, why, _rel(w, data)


def write_gguf(model, path: str | os.PathLike, *, dtype: torch.dtype | None = None, requantize: str | None = None,
               tokenizer=None, gguf_tokenizer: str | os.PathLike | None = None,
               tied: list[str] = ()) -> tuple[list[GGUFTensor], list[str]]:
    """Write ``model`` to the GGUF file ``path`` (not atomic: `export.export` wraps it); (report rows, notes).

    ``dtype``: float32 (default) or float16 for dense tensors (embeddings, layers without an exact type); norms
    stay F32 (as llama.cpp's converter writes them). ``requantize``: a GGML type in `REQUANT_TYPES` for layers
    without an exact type, instead of dense. Tokenizer: the tokenizer.* keys of ``gguf_tokenizer`` (or of the GGUF
    file the model was loaded from, `loading.load_model`), else built from the HF ``tokenizer``. ``tied``: the
    state-dict names of an output embedding tied to the input one (`export._tied_names`), written once."""
    import gguf

    meta = _config_checks(model)
    if requantize is not None and requantize.upper() not in REQUANT_TYPES:
        raise ExportError(f"requantize must be one of {REQUANT_TYPES}, got {requantize!r}")
    requantize = requantize and requantize.upper()
    if dtype not in (None, torch.float32, torch.float16):
        raise ExportError(f"GGUF export writes dense tensors as float32 or float16, got {dtype}")
    dense = "F16" if dtype == torch.float16 else "F32"
    notes = []
    source = gguf_tokenizer or getattr(model, "_hf_compress_gguf_source", None)
    if source is not None and Path(source).is_file():
        tok_kv = _tokenizer_from_gguf(source, meta["vocab_size"])
        notes.append(f"tokenizer copied from {source}")
    elif gguf_tokenizer is not None:
        raise ExportError(f"GGUF tokenizer file {gguf_tokenizer} not found")
    elif tokenizer is not None:
        tok_kv, note = _tokenizer_from_hf(tokenizer, meta["vocab_size"])
        notes += [note] if note else []
    else:
        raise ExportError("GGUF needs a tokenizer: pass tokenizer= (a checkpoint path loads its own) or "
                          "gguf_tokenizer= (--gguf-tokenizer FILE.gguf)")

    layers = compressed_modules(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, meta["block_count"])
    skip = set(tied)  # a tied output embedding's state-dict names: written once, as token_embd
    items: list[tuple[str, object]] = [(k, t) for k, t in model.state_dict().items()
                                       if k not in skip and not any(k.startswith(n + ".") for n in layers)]
    items += [(f"{n}.weight", m) for n, m in layers.items()]
    rows, tensors = [], []
    for key, obj in items:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{key}: no llama GGUF tensor name for it")
        if isinstance(obj, torch.Tensor):  # embeddings, norms, layers left dense: as in the model
            w = obj.detach().float().numpy()
            data = w.astype(np.float16 if dense == "F16" and w.ndim == 2 else np.float32)
            qtype, kind, why, err = ("F16" if data.dtype == np.float16 else "F32"), DENSE, "", _rel(w, data)
        else:
            data, qtype, kind, why, err = _linear_tensor(obj, requantize, dense)
        if ".attn_q." in name or ".attn_k." in name:
            heads = meta["head_count"] if ".attn_q." in name else meta["head_count_kv"]
            data = data[_qk_permutation(data.shape[0], heads).numpy()]
        rows.append(GGUFTensor(name, key, kind, qtype, err, why))
        tensors.append((name, np.ascontiguousarray(data), qtype))

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(str(getattr(model.config, "_name_or_path", "") or "hf-compress model").rsplit("/", 1)[-1])
    writer.add_context_length(meta["context_length"])
    writer.add_embedding_length(meta["embedding_length"])
    writer.add_block_count(meta["block_count"])
    writer.add_feed_forward_length(meta["feed_forward_length"])
    writer.add_head_count(meta["head_count"])
    writer.add_head_count_kv(meta["head_count_kv"])
    writer.add_rope_freq_base(meta["rope_freq_base"])
    writer.add_layer_norm_rms_eps(meta["rms_eps"])
    writer.add_rope_dimension_count(meta["head_dim"])
    if meta["head_dim"] != meta["embedding_length"] // meta["head_count"]:
        writer.add_key_length(meta["head_dim"])
        writer.add_value_length(meta["head_dim"])
    writer.add_vocab_size(meta["vocab_size"])
    main_type = max({r.type for r in rows if ".ffn_" in r.name or ".attn_" in r.name} or {"F32"},
                    key=lambda t: sum(r.type == t for r in rows))
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main_type}", gguf.LlamaFileType.ALL_F32))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok_kv:
        writer.add_key_value(key, value, vtype, sub)
    for name, data, qtype in tensors:
        raw = gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, data, raw_dtype=raw if qtype not in ("F32", "F16") else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return rows, notes
