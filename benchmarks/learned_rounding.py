"""Learned rounding (``learn_rounding``) block by block on SmolLM2-135M cut to its first blocks: each block's output
MSE against the dense block (on the dense stream) with the method's codes and with the learned ones, whether the
learned ones were kept, and the seconds spent in learned rounding. A short probe of the algorithm (a minute of CPU
per method on 2 blocks), not a perplexity; ``benchmarks/quant.py --rows rtn+lr:3:64`` is the whole-model figure.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_rounding.py --methods rtn --iters 20 --batch-size 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_rounding.py --methods gptq --iters 60 --lr 0.005

Calibration: ``--nsamples`` (default 8) x 512 tokens of gutenberg-pg1342.txt, seed 0; bits 3, group 64; every
q/k/v/o/gate/up/down projection of the kept blocks.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

from common import DATA, TARGETS, print_table


class _Blocks(logging.Handler):
    """Collects the pipeline's per-block learned-rounding lines and its closing summary."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.rows, self.seconds = [], None

    def emit(self, record):
        if record.msg.startswith("block %d learned rounding"):
            i, before, after, verdict = record.args[:4]
            self.rows.append({"block": i, "mse_before": round(before, 5), "mse_after": round(after, 5),
                              "kept": verdict == "kept"})
        elif record.msg.startswith("learned rounding: kept"):
            self.seconds = record.args[2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--min-clip", type=float, default=0.5)
    args = p.parse_args()

    import hf_compress
    from hf_compress.loading import load_model, smollm2_gguf_path

    model, tok = load_model(smollm2_gguf_path())
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    log = logging.getLogger("hf_compress.pipelines.sequential")
    log.setLevel(logging.INFO)
    options = {"iters": args.iters, "batch_size": args.batch_size, "lr": args.lr, "min_clip": args.min_clip}
    rows = []
    for method in args.methods:
        catch = _Blocks()
        log.addHandler(catch)
        cfg = {"method": method, "bits": 3, "group_size": 64, "targets": TARGETS,
               "calibration": {"nsamples": args.nsamples, "seqlen": 512, "seed": 0}, "learn_rounding": options}
        t0 = time.time()
        hf_compress.compress(copy.deepcopy(model), cfg, calibration=str(DATA / "gutenberg-pg1342.txt"),
                             tokenizer=tok, progress=False)
        log.removeHandler(catch)
        lr = args.lr if args.lr is not None else 1 / args.iters
        for r in catch.rows:
            rows.append({"method": method, "iters": args.iters, "batch_size": args.batch_size, "lr": round(lr, 4),
                         "min_clip": args.min_clip, **r, "lr_s_all_blocks": round(catch.seconds, 1),
                         "compress_s": round(time.time() - t0, 1)})
    print_table(rows, ["method", "iters", "batch_size", "lr", "min_clip", "block", "mse_before", "mse_after", "kept",
                       "lr_s_all_blocks", "compress_s"],
                title=f"\nSmolLM2-135M, first {args.blocks} blocks, w3 g64, learned rounding; calibration "
                      f"{args.nsamples} x 512 tokens of gutenberg-pg1342.txt")


if __name__ == "__main__":
    sys.exit(main())
