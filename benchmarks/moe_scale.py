"""Compression cost at Qwen3-30B-A3B's block shape: hidden 2048, 128 experts of 768 neurons (top-8), 32 query / 4
KV heads of 128, random bf16 weights saved to disk and loaded with every block on disk (accelerate offload), as a
model too large for RAM would be. Per block: wall time and peak RSS of `hf_compress.compress` for a calibrated
method, against the memory formula below; then the whole-model extrapolation (48 blocks).

Memory formula (what one block's compression holds beyond the process's baseline after loading; bytes):

* the block's dense weights while it is processed (its experts' fused tensors are read once: `_ExpertSlices`):
  ``W = 2 · (E · 3 · H · I + attention)`` in bf16 (a layer being fitted is upcast to fp32 alone: small);
* the statistics of one group of layers sharing an input: ``8 · E · H²`` (an fp64 Gram per expert's gate/up
  input; for SVD-LLM too: its held-out windows, kept apart only for layers with cross terms, count in an expert's
  one Gram) — the largest term. Groups are gathered one at a time: the gate/up Grams are released before the down
  group's (``8 · E · I²``, smaller) are gathered, each as soon as its layer is fitted;
* the block's compressed layers until the block is checkpointed: ``params · bits / 8`` of codes plus fp16 scales and
  zeros (``4 / group`` bytes per weight) for GPTQ; ``2 · ratio · params`` for SVD-LLM's factors (bf16);
* one layer's fit workspace, the largest layer's (an expert's gate/up, [2I, H]): ``4 · 8 · H²`` (GPTQ: the damped
  Hessian, its inverse, the Cholesky factor, the identity it starts from, in fp64) plus ``4 · 4 · 2I · H`` (the fp32
  weight, codes, continuous weights and the error block); SVD-LLM: ``3 · 8 · H²`` (Gram, Cholesky factor, whitened
  product) plus ``4 · 4 · 2I · H`` (its SVD's inputs and outputs);
* the calibration stream(s): ``4 · tokens · H`` each (one for GPTQ; two for SVD-LLM's compensation: its reference
  forward runs the block itself, before any of it is fitted, not a copy);
* the blocks compressed before, which, once checkpointed, are read back memory-mapped (`hf_compress.resume`).

Command (one row per method, each in its own process; about 10 minutes per row on 2 cores)::

    python benchmarks/moe_scale.py                     # gptq 4-bit g128 and svd_llm 0.3, 2 blocks, 8 x 512 tokens
    python benchmarks/moe_scale.py --methods gptq --blocks 1 --nsamples 4
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb, print_table, run_rows

HIDDEN, EXPERTS, TOP_K, MOE_INTER, HEADS, KV_HEADS, HEAD_DIM, FULL_BLOCKS = 2048, 128, 8, 768, 32, 4, 128, 48
VOCAB = 2048  # small: the embeddings are not what is measured
BITS, GROUP, RATIO = 4, 128, 0.3  # the gptq and svd_llm rows' settings


def build(folder: Path, blocks: int) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=6144, moe_intermediate_size=MOE_INTER,
                            num_hidden_layers=blocks, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                            head_dim=HEAD_DIM, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                            max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder)


def formula_mb(method: str, tokens: int) -> dict[str, float]:
    attention = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2
    experts = EXPERTS * 3 * HIDDEN * MOE_INTER
    params = experts + attention
    gptq = method == "gptq"
    terms = {
        "block bf16": 2 * params,
        "statistics": 8 * EXPERTS * HIDDEN * HIDDEN,
        "compressed block": params * (BITS / 8 + 4 / GROUP) if gptq else 2 * RATIO * params,
        "fit workspace": (4 if gptq else 3) * 8 * HIDDEN * HIDDEN + 4 * 4 * 2 * MOE_INTER * HIDDEN,
        "streams": 4 * tokens * HIDDEN * (1 if gptq else 2),
    }
    return {k: v / 2**20 for k, v in terms.items()}


def row(method: str, folder: str, nsamples: int, seqlen: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_compress
    from hf_compress.progress import reset_peak_rss, rss_mb

    torch.set_num_threads(2)
    times: list[float] = []
    peaks: list[float] = []

    class Blocks(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            m = re.search(r"block \d+/\d+ done \(([\d.]+) s\).*peak RSS (\d+) MiB", msg)
            if m:
                times.append(float(m.group(1)))
                peaks.append(float(m.group(2)))

    logging.getLogger("hf_compress.progress").addHandler(Blocks())
    logging.getLogger("hf_compress.progress").setLevel(logging.INFO)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    with tempfile.TemporaryDirectory() as offload:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=offload,
                                                     dtype=torch.bfloat16)
        ids = torch.randint(0, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        config = ({"method": "gptq", "bits": BITS, "group_size": GROUP} if method == "gptq"
                  else {"method": "svd_llm", "ratio": RATIO, "alloc": "uniform"})
        config["calibration"] = {"nsamples": nsamples, "seqlen": seqlen, "batch_size": 4}
        reset_peak_rss()  # the load's own peak (safetensors read whole before offloading) is not the run's
        baseline = rss_mb()
        t0 = time.time()
        with tempfile.TemporaryDirectory() as ckpt:
            hf_compress.compress(model, config, calibration=ids, progress=False, checkpoint_dir=ckpt)
        total = time.time() - t0
    formula = formula_mb(method, nsamples * seqlen)
    return {"label": method, "blocks": len(times), "s/block": sum(times) / max(len(times), 1), "total s": total,
            "baseline MiB": baseline, "peak MiB": max(peaks or [peak_rss_mb()]),
            "formula MiB": sum(formula.values()), **{f"{k} MiB": v for k, v in formula.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["gptq", "svd_llm"])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--row", nargs=4, metavar=("METHOD", "FOLDER", "NSAMPLES", "SEQLEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        import json

        method, folder, nsamples, seqlen = args.row
        print("ROW " + json.dumps(row(method, folder, int(nsamples), int(seqlen))), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen3moe-30b-shaped"
        build(folder, args.blocks)
        results = run_rows(__file__, [(m, [m, str(folder), str(args.nsamples), str(args.seqlen)]) for m in args.methods])
    cols = ["method", "blocks", "s / block", f"{FULL_BLOCKS} blocks", "RSS after load MiB", "peak above it MiB",
            "formula MiB", "measured / formula"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"method": r["label"], "blocks": "failed: " + r["error"]})
            continue
        above = r["peak MiB"] - r["baseline MiB"]
        rows.append(dict(zip(cols, [r["label"], r["blocks"], f"{r['s/block']:.0f}",
                                    f"{r['s/block'] * FULL_BLOCKS / 60:.0f} min", f"{r['baseline MiB']:.0f}",
                                    f"{above:.0f}", f"{r['formula MiB']:.0f}", f"{above / r['formula MiB']:.2f}"])))
    print(f"Qwen3-30B-A3B-shaped blocks (hidden {HIDDEN}, {EXPERTS} experts x {MOE_INTER}, top-{TOP_K}), random bf16 "
          f"weights on disk, {args.nsamples} x {args.seqlen} calibration tokens")
    print_table(rows, cols)


if __name__ == "__main__":
    sys.exit(main())
