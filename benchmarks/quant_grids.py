"""Which grid for the data-free quantizers: SmolLM2-135M, 3-bit/g64, all q/k/v/o/gate/up/down projections,
perplexity on the first 4096 tokens of WikiText-2 (a quick screen; benchmarks/quant.py runs the full protocol).

    .venv/bin/python benchmarks/quant_grids.py            # all variants, ~2-4 min each on 2 cores
    .venv/bin/python benchmarks/quant_grids.py rtn rtn-int
    .venv/bin/python benchmarks/quant_grids.py rtn --eval-tokens 1024     # a quick look
"""

from __future__ import annotations

import argparse
import copy
import time

from common import DATA, TARGETS, print_table

VARIANTS = {
    "rtn": ("rtn", {"integer_zero": False}),
    "rtn-int": ("rtn", {"integer_zero": True}),
    "hqq-float": ("hqq", {"integer_zero": False, "min_shrink": 0.5}),
    "hqq-int": ("hqq", {"integer_zero": True, "min_shrink": 0.5}),
    "hqq-int-85": ("hqq", {"integer_zero": True, "min_shrink": 0.85, "steps": 8}),
    "hqq-int-noclip": ("hqq", {"integer_zero": True, "min_shrink": 1.0, "steps": 1}),
}


def main():
    import hf_compress
    from hf_compress.evaluation import perplexity
    from hf_compress.loading import load_model, read_text, smollm2_gguf_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", help=f"some of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="WikiText-2 tokens scored (default 4096)")
    args = p.parse_args()
    names = args.variants or list(VARIANTS)
    if set(names) - set(VARIANTS):
        p.error(f"unknown variants {sorted(set(names) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    base, tok = load_model(smollm2_gguf_path())
    text = read_text(DATA / "wikitext-2-raw-test.txt")
    ppl_col = f"perplexity ({args.eval_tokens} tokens)"
    rows = []
    for name in names:
        method, kwargs = VARIANTS[name]
        model = copy.deepcopy(base)
        t0 = time.time()
        hf_compress.compress(model, {"method": method, "bits": 3, "group_size": 64, "targets": TARGETS,
                                     "method_kwargs": kwargs}, progress=False)
        model.dequantize()
        ppl = perplexity(model, tok, text, max_tokens=args.eval_tokens, progress=False).perplexity
        rows.append({"variant": name, "method": method, "method_kwargs": kwargs, ppl_col: ppl,
                     "seconds": f"{time.time() - t0:.0f}"})
        print(rows[-1], flush=True)
    print_table(rows, title="SmolLM2-135M, 3-bit g64, every q/k/v/o/gate/up/down projection")


if __name__ == "__main__":
    main()
