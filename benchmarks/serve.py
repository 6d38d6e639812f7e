"""Serving speed in vLLM with the hf-compress plugin: SmolLM2-135M-Instruct dense bf16 vs our 4-bit, 3-bit and low
rank 0.4 checkpoints vs the stock compressed-tensors export of the same 4-bit weights (vLLM's own W4A16 path).

    .venv-vllm/bin/python benchmarks/serve.py [--work DIR] [--ct-export DIR] [--threads N]
    .venv-vllm/bin/python benchmarks/serve.py --rows "plugin rtn 4-bit g64"      # some rows (dense bf16 always runs)

Every row is measured in this one run, one vLLM engine after another (bf16 activations, eager mode,
``VLLM_CPU_KVCACHE_SPACE=1``): batch-1 decode tokens/s, the 63 tokens after the first of a 64-token greedy
continuation of a 16-token prompt ((t(64) - t(1)) / 63, best of 2), and the throughput of 8 concurrent requests
(8 x 64 generated tokens / wall time, prefill included); both also as ratios to dense bf16.

Checkpoints are made in ``--work`` (reused when present): ``rtn`` 4-bit g64 (integer zeros, so its compressed-tensors
export holds exactly the same weights), ``hqq`` 3-bit g64, ``svd`` ratio 0.4 (data-free; a speed row — its quality
is svd's, see the README). The export comes from ``hf_compress.export`` when this hf-compress has it, or from
``--ct-export`` (a folder ``hf-compress export <work>/rtn-4bit -o DIR --format compressed-tensors`` wrote).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

from common import print_table

ROWS = {  # label -> hf-compress config (None: the dense model)
    "dense bf16": None,
    "plugin rtn 4-bit g64": {"method": "rtn", "bits": 4, "group_size": 64},
    "plugin hqq 3-bit g64": {"method": "hqq", "bits": 3, "group_size": 64},
    "plugin svd low rank 0.4": {"method": "svd", "ratio": 0.4},
}
STOCK = "stock vLLM W4A16 (compressed-tensors export of the rtn 4-bit weights)"
PROMPT_TOKENS, NEW_TOKENS, CONCURRENT = 16, 64, 8


def make_checkpoints(work: Path, ct_export: Path | None, rows: list[str]) -> dict[str, Path]:
    import hf_compress
    from hf_compress.loading import load_model, smollm2_gguf_path

    paths = {}
    for label, config in ROWS.items():
        if label not in rows:
            continue
        path = work / label.replace(" ", "-")
        if not (path / "config.json").exists():
            model, _ = load_model(smollm2_gguf_path())
            if config is None:
                model.save_pretrained(path)
            else:
                hf_compress.compress(model, config, progress=False)
                hf_compress.save_pretrained(model, path)
        paths[label] = path
    if "stock" not in rows:
        return paths
    if ct_export is None:
        try:
            from hf_compress.export import export
        except ImportError:
            print("no hf_compress.export here and no --ct-export: the stock compressed-tensors row is skipped")
            return paths
        ct_export = work / "rtn-4bit-g64-compressed-tensors"
        if not (ct_export / "config.json").exists():
            rtn4 = work / "plugin-rtn-4-bit-g64"
            if not (rtn4 / "config.json").exists():
                make_checkpoints(work, None, ["plugin rtn 4-bit g64"])  # the export's source, not a row here
            export(rtn4, ct_export, format="compressed-tensors")
    paths[STOCK] = ct_export
    return paths


def measure(path: Path) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(str(path), dtype="bfloat16", enforce_eager=True, max_model_len=256, max_num_seqs=CONCURRENT,
              skip_tokenizer_init=True, seed=0)
    prompts = [{"prompt_token_ids": [(17 * i + 31 * j) % 1000 + 100 for j in range(PROMPT_TOKENS)]}
               for i in range(CONCURRENT)]

    def timed(batch, n):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    timed(prompts[:1], 8)  # warm-up
    decode = min((timed(prompts[:1], NEW_TOKENS) - timed(prompts[:1], 1)) for _ in range(2))
    wall = min(timed(prompts, NEW_TOKENS) for _ in range(2))
    del llm
    gc.collect()
    return {"decode": (NEW_TOKENS - 1) / decode, "throughput": CONCURRENT * NEW_TOKENS / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf-compress-serve-bench"))
    parser.add_argument("--ct-export", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the vLLM worker")
    parser.add_argument("--rows", nargs="+", choices=[*ROWS, "stock"], default=[*ROWS, "stock"],
                        help="rows to measure (stock: the compressed-tensors export in stock vLLM); dense bf16, the "
                             "base of the ratios, always runs")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")  # the stock W4A16 row: weight-only, activations not int8
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    paths = make_checkpoints(args.work, args.ct_export, ["dense bf16", *args.rows])
    load = os.getloadavg()
    results = {}
    for label, path in paths.items():
        results[label] = measure(path)
        print(f"ROW {label}: {results[label]}", flush=True)  # as each lands (a row takes minutes on 2 cores)
    base = results["dense bf16"]
    stock = results.get(STOCK)
    cols = ["row", "batch-1 decode tokens/s", "vs dense bf16", "vs stock W4A16", f"{CONCURRENT} concurrent tokens/s",
            "concurrent vs dense bf16", "concurrent vs stock W4A16"]
    table = [dict(zip(cols, (label, f"{r['decode']:.1f}", f"{r['decode'] / base['decode']:.2f}",
                             f"{r['decode'] / stock['decode']:.2f}" if stock else "-",
                             f"{r['throughput']:.1f}", f"{r['throughput'] / base['throughput']:.2f}",
                             f"{r['throughput'] / stock['throughput']:.2f}" if stock else "-")))
             for label, r in results.items()]
    print_table(table, cols, title=f"\nSmolLM2-135M-Instruct in vLLM (CPU, {args.threads} threads, bf16 activations, "
                                   f"eager; load average {load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
