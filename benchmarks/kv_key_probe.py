"""Probe: would quantizing keys *before* RoPE (KVQuant) help the 2-bit KV cache on SmolLM2-135M?

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/kv_key_probe.py      # about 1 minute

One 2048-token window of WikiText-2 raw test; per layer, the keys are quantized per channel (KIVI layout, groups of
32 tokens, `hf_compress.kernels.reference.kv`) either after RoPE (what the cache sees) or before it (then rotated), and the error
of the attention scores q·kᵀ/√d of the last 128 queries against every key is summed over layers (mean square).
"""

from __future__ import annotations

import math

import torch

from common import DATA, print_table


def main():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from hf_compress.kernels import kv_dequantize, kv_quantize
    from hf_compress.loading import load_model, read_text, smollm2_gguf_path

    model, tok = load_model(smollm2_gguf_path())
    ids = tok(read_text(DATA / "wikitext-2-raw-test.txt")[:40000], return_tensors="pt").input_ids[:, :2048]
    cap = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            getattr(layer.self_attn, name).register_forward_hook(
                lambda m, inp, out, key=(name, i): cap.__setitem__(key, out.detach()))
    with torch.no_grad():
        model(ids)
    cfg, t = model.config, ids.shape[1]
    hd = cfg.hidden_size // cfg.num_attention_heads
    cos, sin = model.model.rotary_emb(torch.zeros(1, t, hd), torch.arange(t)[None])

    def quant(x, bits):
        return kv_dequantize(*kv_quantize(x.float(), bits, 32, "channel", torch.float16), bits, 32, "channel",
                             torch.float32)

    rows = []
    for bits in (2, 4):
        post = pre = 0.0
        for i in range(cfg.num_hidden_layers):
            k = cap[("k_proj", i)].view(1, t, -1, hd).transpose(1, 2)
            q = cap[("q_proj", i)].view(1, t, -1, hd).transpose(1, 2)
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
            q_rot = q_rot.view(1, k.shape[1], -1, t, hd)[..., -128:, :]  # query heads grouped by their KV head

            def err(k_hat):
                d = torch.einsum("bhgtd,bhsd->bhgts", q_rot, k_hat - k_rot) / math.sqrt(hd)
                return float(d.square().mean())

            post += err(quant(k_rot, bits))
            pre += err(apply_rotary_pos_emb(q, quant(k, bits), cos, sin)[1])
        rows.append({"key bits": bits, "score MSE, quantized after RoPE": post, "quantized before RoPE": pre,
                     "ratio": post / pre})
    print_table(rows, formats={"ratio": ".2f"}, title=f"SmolLM2-135M, one {t}-token window of WikiText-2 raw test")


if __name__ == "__main__":
    main()
