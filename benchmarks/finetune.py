"""Recovery fine-tuning on SmolLM2-135M, one command, one table, one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/finetune.py                 # ~50 min on 2 cores
    .venv/bin/python benchmarks/finetune.py --steps 20 --eval-tokens 4096      # quick look

Rows (each in its own process, so peak RSS is that row's own):
- ``compressed``: compress with ``--method`` at ``--ratio`` (PEERS protocol calibration: 32 x 512 tokens of
  gutenberg-pg1342, seed 0, every q/k/v/o/gate/up/down), perplexity on WikiText-2, then
  ``hf_compress.finetune.recover`` (LoRA rank 16 on the compressed layers, Trainer, exact merge) on
  gutenberg-pg2701 -- the same code path as ``hf-compress finetune`` -- and perplexity again;
- ``dense-lora``: the uncompressed model fine-tuned with the same LoRA (same layers, rank, windows, batch,
  optimizer) for ``--dense-steps`` steps: the reference for training memory and step time.

``train_peak_rss_MB`` is the process's peak resident memory from just before training to its end (the counter is
reset there), so it covers weights, LoRA states, activations and the optimizer, but not compression.
"""

from __future__ import annotations

import argparse
import time

from common import DATA, TARGETS, peak_rss_mb, print_table, reset_peak_rss, run_rows


def run_row(args) -> dict:
    import torch

    import hf_compress
    from hf_compress.evaluation import perplexity
    from hf_compress.finetune import recover
    from hf_compress.loading import load_model, read_text, smollm2_gguf_path

    torch.manual_seed(0)
    model, tok = load_model(smollm2_gguf_path())
    wiki = read_text(DATA / "wikitext-2-raw-test.txt")
    ppl = lambda m: perplexity(m, tok, wiki, max_tokens=args.eval_tokens, progress=False).perplexity  # noqa: E731
    row = {"row": args.kind}
    if args.kind == "compressed":
        row["method"] = f"{args.method} {args.ratio}"
        t0 = time.time()
        hf_compress.compress(model, {"method": args.method, "ratio": args.ratio, "targets": TARGETS,
                                     "calibration": {"nsamples": 32, "seqlen": 512, "seed": 0}},
                             calibration=str(DATA / "gutenberg-pg1342.txt"), tokenizer=tok, progress=False)
        row["compress_s"] = round(time.time() - t0)
        targets = None
    else:
        row["method"] = "dense"
        targets = TARGETS
    compressed = args.kind == "compressed"  # the dense row measures training memory and time only
    if compressed:
        row["ppl_before"] = ppl(model)
    reset_peak_rss()
    row["rss_before_train_MB"] = round(peak_rss_mb())
    t0 = time.time()
    model, losses = recover(model, tok, str(DATA / args.train_text), steps=args.steps, rank=args.lora_rank,
                            lr=args.lr, batch_size=args.batch_size, seqlen=512, seed=0, progress=False,
                            target_modules=targets)
    row["train_s"] = round(time.time() - t0)
    row["s_per_step"] = round((time.time() - t0) / args.steps, 2)
    row["train_peak_rss_MB"] = round(peak_rss_mb())
    row["loss_first"], row["loss_last"] = round(losses[0], 3), round(losses[-1], 3)
    if compressed:
        row["ppl_after"] = ppl(model)
    row["steps"] = args.steps
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="svd_llm", help="low-rank method for the compressed row (default svd_llm)")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--dense-steps", type=int, default=8, help="steps of the dense-lora row (memory and step time)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--train-text", default="gutenberg-pg2701.txt")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--rows", nargs="+", default=["compressed", "dense-lora"])
    p.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        import json

        print("ROW " + json.dumps(run_row(args)), flush=True)
        return
    common = ["--method", args.method, "--ratio", str(args.ratio),
              "--batch-size", str(args.batch_size), "--lora-rank", str(args.lora_rank), "--lr", str(args.lr),
              "--train-text", args.train_text, "--eval-tokens", str(args.eval_tokens)]
    steps = {"compressed": args.steps, "dense-lora": args.dense_steps}
    results = run_rows(__file__, [(kind, ["--kind", kind, *common, "--steps", str(steps[kind])]) for kind in args.rows])
    print_table(results, ["row", "method", "steps", "ppl_before", "ppl_after", "loss_first", "loss_last",
                          "train_s", "s_per_step", "rss_before_train_MB", "train_peak_rss_MB"],
                title=f"\nSmolLM2-135M, LoRA rank {args.lora_rank} on {args.train_text}, batch {args.batch_size}; "
                      f"perplexity on the first {args.eval_tokens} tokens of WikiText-2 raw test")


if __name__ == "__main__":
    main()
