"""Exports of SmolLM2-135M in stock vLLM: size, perplexity (ours in transformers vs the export in transformers and in
vLLM) and vLLM batch-1 decode tokens/s, dense bf16 vs the 4-bit compressed-tensors export. Runs in vLLM's
environment, after scripts/test-vllm has made it:

    .venv-vllm/bin/python benchmarks/export.py [--max-tokens 4096] [--decode-tokens 64]

The model is the one tests/vllm_serving use (RTN 4-bit g64 on every projection, EoRA rank 16 on blocks 24-29),
exported with ``dtype="bfloat16"`` (scales stay fp16). Perplexity: hf_compress.evaluation's protocol on the first
``--max-tokens`` tokens of WikiText-2 test (512-token windows); vLLM's is computed from its prompt log-probabilities
of the same windows. Prints a Markdown table (docs/export.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm_serving"))
from serving import EORA_RANK, build_smollm2, run_engine  # noqa: E402

from common import DATA, print_table  # noqa: E402


def _windows(tokenizer, text: str, max_tokens: int, seqlen: int = 512) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return [ids[i:i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]


def _vllm_ppl(scored: list[list[float]]) -> float:
    nll = [-x for window in scored for x in window]
    return math.exp(sum(nll) / len(nll))


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from hf_compress.evaluation import perplexity
    from hf_compress.export import export
    from hf_compress.loading import load_model, smollm2_gguf_path

    text = (DATA / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="hf-compress-export-bench-"))
    dense, tokenizer = load_model(smollm2_gguf_path())
    ppl = {"dense": perplexity(dense, tokenizer, text, max_tokens=args.max_tokens, progress=False).perplexity}
    dense.to(torch.bfloat16).save_pretrained(work / "dense-bf16")
    tokenizer.save_pretrained(work / "dense-bf16")
    del dense
    model, _ = build_smollm2()
    ppl["ours"] = perplexity(model, tokenizer, text, max_tokens=args.max_tokens, progress=False).perplexity
    result = export(model, work / "ct", dtype="bfloat16", tokenizer=tokenizer)
    export(model, work / "dense-export", format="dense", dtype="bfloat16", tokenizer=tokenizer)
    ct_hf = AutoModelForCausalLM.from_pretrained(work / "ct", dtype=torch.float32)
    ppl["ct_hf"] = perplexity(ct_hf, tokenizer, text, max_tokens=args.max_tokens, progress=False).perplexity
    from peft import PeftModel

    ct_lora = PeftModel.from_pretrained(ct_hf, result.adapter)  # ct_hf has run a forward: its weights exist
    ppl["ct_lora_hf"] = perplexity(ct_lora, tokenizer, text, max_tokens=args.max_tokens, progress=False).perplexity
    del ct_hf, ct_lora
    windows = _windows(tokenizer, text, args.max_tokens)
    decode = {"tokens": args.decode_tokens, "repeats": 3}
    runs = {
        "dense-bf16": run_engine({"model": str(work / "dense-bf16"), "dtype": "bfloat16", "score": windows,
                                  "decode": decode}, work, "dense-bf16"),
        "ct-bf16": run_engine({"model": str(work / "ct"), "dtype": "bfloat16", "score": windows, "decode": decode},
                              work, "ct-bf16"),
        "ct-fp16": run_engine({"model": str(work / "ct"), "dtype": "float16", "score": windows, "decode": decode},
                              work, "ct-fp16"),
        # no vLLM perplexity with the adapter: prompt_logprobs with --enable-lora crashes on CPU (tests/vllm_serving)
        "ct-lora": run_engine({"model": str(work / "ct"), "dtype": "float16", "adapter": result.adapter,
                               "max_lora_rank": EORA_RANK, "decode": decode}, work, "ct-lora"),
    }
    dense_tps = runs["dense-bf16"]["base"]["decode_tps"]
    rows = [
        ("SmolLM2-135M dense (the GGUF dequantized; vLLM reads a bf16 copy)", _size_mib(work / "dense-bf16"),
         ppl["dense"],
         _vllm_ppl(runs["dense-bf16"]["base"]["scored"]), "bf16", dense_tps),
        ("hf-compress RTN 4-bit g64 + EoRA r16 (blocks 24-29), fp32, transformers", None, ppl["ours"], None, None,
         None),
        ("compressed-tensors export, base (no adapter)", _size_mib(work / "ct"), ppl["ct_hf"],
         _vllm_ppl(runs["ct-bf16"]["base"]["scored"]), "bf16", runs["ct-bf16"]["base"]["decode_tps"]),
        ("compressed-tensors export, base (no adapter)", None, None, _vllm_ppl(runs["ct-fp16"]["base"]["scored"]),
         "fp16", runs["ct-fp16"]["base"]["decode_tps"]),
        (f"compressed-tensors export + EoRA LoRA adapter ({_size_mib(Path(result.adapter)):.1f} MiB), PEFT", None,
         ppl["ct_lora_hf"], None, "fp16, --enable-lora", runs["ct-lora"]["lora"]["decode_tps"]),
        ("dense export (every layer multiplied out)", _size_mib(work / "dense-export"), None, None, None, None),
    ]
    cols = ["model", "weights MiB", "ppl (transformers)", "ppl (vLLM)", "vLLM dtype", "vLLM decode tok/s", "vs dense"]
    table = [dict(zip(cols, (name, size, p_hf, p_vllm, dt, tps, tps and tps / dense_tps)))
             for name, size, p_hf, p_vllm, dt, tps in rows]
    print_table(table, cols, formats={"weights MiB": ".1f", "ppl (transformers)": ".3f", "ppl (vLLM)": ".3f",
                                      "vLLM decode tok/s": ".1f", "vs dense": ".2f"},
                right=("weights MiB", "ppl (transformers)", "ppl (vLLM)", "vLLM decode tok/s", "vs dense"),
                title=f"WikiText-2 test, first {args.max_tokens} tokens, {len(windows)} windows of 512; batch-1 decode "
                      f"of {args.decode_tokens} tokens, best of 3")


if __name__ == "__main__":
    main()
