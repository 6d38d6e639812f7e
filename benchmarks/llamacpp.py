"""SmolLM2-135M RTN 4-bit g32: our CPU path against the same model exported to GGUF and run by llama.cpp.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/llamacpp.py                  # ~10 min on 2 cores
    .venv/bin/python benchmarks/llamacpp.py --max-tokens 2048 --new-tokens 16  # a quick look

Exports with `hf_compress.export.export(..., format="gguf")` (every projection exact Q4_1), then measures, on both:
prefill seconds of a ``--prompt-tokens`` prompt (the first tokens of WikiText-2 test), greedy decode tokens/s of
``--new-tokens`` tokens after it, and WikiText-2 perplexity by the project's protocol (docs/benchmarks.md:
non-overlapping 512-token windows of our tokenizer's ids, each scored on its own). llama.cpp is fed the same token
ids and scores each window from ``Llama(..., logits_all=True)``. llama.cpp rows need llama-cpp-python
(``pip install llama-cpp-python``, a source build of several minutes); without it only our rows are printed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import DATA, TARGETS, print_table


def ours(model, tokenizer, prompt, windows, new_tokens):
    from hf_compress.evaluation import decode_speed

    tps, prefill = decode_speed(model, prompt[None], new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None], use_cache=False).logits.float()[0]
            nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            count += w.numel() - 1
    return {"prefill_s": prefill, "decode_tok_s": tps, "ppl": math.exp(nll / count)}


def llama_cpp_rows(path, prompt, windows, new_tokens, threads):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, len(prompt) + new_tokens), logits_all=True,
                          n_threads=threads, n_batch=512, verbose=False)
    prompt = [int(t) for t in prompt]
    best_prefill, best_tps = float("inf"), 0.0
    for _ in range(2):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        best_prefill = min(best_prefill, time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        best_tps = max(best_tps, new_tokens / (time.perf_counter() - start))
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:].numpy()].sum())
        count += len(w) - 1
    return {"prefill_s": best_prefill, "decode_tok_s": best_tps, "ppl": math.exp(nll / count)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/hf-compress-smollm2-rtn4-g32.gguf", help="where the GGUF is written")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 tokens scored (512-token windows)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    args = p.parse_args()

    import hf_compress
    from hf_compress.export import export
    from hf_compress.loading import load_model, smollm2_gguf_path

    torch.set_num_threads(args.threads)
    text = (DATA / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")
    model, tokenizer = load_model(smollm2_gguf_path())
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 32, "targets": TARGETS}, progress=False)
    result = export(model, args.out, format="gguf", tokenizer=tokenizer)
    kinds = sorted({(t.kind, t.type) for t in result.tensors})
    print(f"exported {args.out} ({result.bytes / 2**20:.1f} MiB): {kinds}", flush=True)

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][: args.max_tokens]
    windows = ids[: ids.numel() // 512 * 512].view(-1, 512)
    prompt = ids[: args.prompt_tokens]
    rows = {"hf-compress (CPU kernels, fp32 model)": ours(model, tokenizer, prompt, windows, args.new_tokens)}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama = None
        print("llama_cpp is not installed: only our rows (pip install llama-cpp-python, a source build of minutes)")
    else:
        llama = llama_cpp_rows(args.out, prompt, windows, args.new_tokens, args.threads)
        rows["llama.cpp (GGUF export, Q4_1)"] = llama
    base = rows["hf-compress (CPU kernels, fp32 model)"]
    table = [{"engine": name, "prefill s": r["prefill_s"], "decode tok/s": r["decode_tok_s"], "ppl": r["ppl"],
              "prefill ratio": r["prefill_s"] / base["prefill_s"], "decode ratio": r["decode_tok_s"] / base["decode_tok_s"]}
             for name, r in rows.items()]
    print_table(table, formats={"prefill s": ".3f", "decode tok/s": ".1f", "ppl": ".3f", "prefill ratio": ".2f",
                                "decode ratio": ".2f"},
                right=("prefill s", "decode tok/s", "ppl", "prefill ratio", "decode ratio"),
                title=f"\nSmolLM2-135M RTN 4-bit g32, {args.threads} threads; prompt {len(prompt)} tokens, "
                      f"{args.new_tokens} new tokens, WikiText-2 {len(windows)} windows of 512")


if __name__ == "__main__":
    main()
