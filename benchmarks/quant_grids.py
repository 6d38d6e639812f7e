"""Which grid for the data-free quantizers: SmolLM2-135M, 3-bit/g64, all q/k/v/o/gate/up/down projections,
perplexity on the first 4096 tokens of WikiText-2 (a quick screen; benchmarks/quant.py runs the full protocol).

    .venv/bin/python benchmarks/quant_grids.py            # all variants, ~2-4 min each on 2 cores
    .venv/bin/python benchmarks/quant_grids.py rtn rtn-int
"""

from __future__ import annotations

import copy
import sys
import time

from common import DATA, TARGETS

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

    names = sys.argv[1:] or list(VARIANTS)
    base, tok = load_model(smollm2_gguf_path())
    text = read_text(DATA / "wikitext-2-raw-test.txt")
    print("| variant | method | method_kwargs | perplexity (4096 tokens) | seconds |\n|---|---|---|---|---|")
    for name in names:
        method, kwargs = VARIANTS[name]
        model = copy.deepcopy(base)
        t0 = time.time()
        hf_compress.compress(model, {"method": method, "bits": 3, "group_size": 64, "targets": TARGETS,
                                     "method_kwargs": kwargs}, progress=False)
        model.dequantize()
        ppl = perplexity(model, tok, text, max_tokens=4096, progress=False).perplexity
        print(f"| {name} | {method} | {kwargs} | {ppl:.4g} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
