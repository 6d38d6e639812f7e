"""What compression costs on SmolLM2-135M, each method beside a same-run plain-torch baseline of the peer's core
work — one command, one table:

    .venv/bin/python benchmarks/compress_cost.py                    # every row (~30 min on 2 quiet cores)
    .venv/bin/python benchmarks/compress_cost.py --rows svd:0.4 base-svd --eval-tokens 0

Baselines (timed on the same 210 projections, same threads, same process layout: one process per row):

* ``base-svd``: one fp32 ``torch.linalg.svd`` per weight (the plain-SVD reference's core work);
* ``base-rtn:B:G``: min-max rounding per group in plain torch (scale, zero, round, clamp);
* ``base-svd_llm:R``: SVD-LLM's core: one dense forward over the calibration windows accumulating each layer's
  Gram XᵀX (fp32 products, as its reference code), then per layer Cholesky whitening, one fp32 SVD of W·S and
  the rank-r factors with S⁻¹ folded back (uniform ratio R).

``--7b`` (= ``--llama7b-blocks 2 --nsamples 4`` unless those are given; ``--methods-7b``, ``--timeout-7b`` seconds
per method) or ``--llama7b-blocks N`` measures instead a Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads,
N blocks of random fp16 weights written to disk one block at a time, SmolLM2's tokenizer and vocabulary) compressed
through the CLI with accelerate disk offload (``--device-map auto --max-memory cpu=1GiB --offload-folder``): per
block time and peak RSS for svd_llm, asvd, gptq and (data-free) svd from the CLI's ``-v`` progress lines, beside the
memory formula (`formula_mb`) and the extrapolation to 32 blocks; the RSS once each block is done (finished blocks
are read back from the checkpoint folder, memory-mapped, rather than kept in RAM) and the peak including the save.

A method row is ``method:setting`` (``svd:0.4``, ``rtn:4:128``, ``svd_llm:0.2``, ``gptq:3:64``) run through
``hf_compress.compress`` with each method's defaults, timed from the loaded model to the compressed one, then
scored by perplexity (protocol of ../shared/PEERS.md: first ``--eval-tokens`` of WikiText-2 raw test, 512-token
windows; calibration 32 x 512 tokens of gutenberg-pg1342, seed 0). ``ratio`` = method time / baseline time of
the same run; ``README ppl`` is the perplexity the README reported for that setting before this work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import DATA, TARGETS, peak_rss_mb, print_table, reset_peak_rss, run_rows

#: method row -> (baseline row, target ratio or seconds, README ppl at 32768 tokens)
ROWS = {
    "svd:0.4": ("base-svd", "<= 1.2x", 1.5e7),
    "rtn:2:128": ("base-rtn:2:128", "<= 5 s", None),
    "rtn:4:128": ("base-rtn:4:128", "<= 5 s", 39.36),
    "rtn:3:64": ("base-rtn:3:64", "<= 5 s", 95.34),
    "rtn:8:128": ("base-rtn:8:128", "<= 5 s", None),
    "svd_llm:0.2": ("base-svd_llm:0.2", "<= 1.5x", 96.16),
    "gptq:3:64": (None, "<= 150 s", 83.14),
}
DEFAULT = [r for m, (b, _, _) in ROWS.items() for r in ([b] if b else []) + [m]]


def _weights(model):
    from hf_compress.targets import dense_weight, find_targets

    return {n: dense_weight(m).detach() for n, m in find_targets(model, TARGETS, []).items()}


def base_svd(model, args) -> None:
    import torch

    for w in _weights(model).values():
        torch.linalg.svd(w.float(), full_matrices=False)


def base_rtn(model, args, bits: int, g: int) -> None:
    import torch

    maxq = 2**bits - 1
    for w in _weights(model).values():
        out, n = w.shape
        wg = torch.nn.functional.pad(w.float(), (0, -n % g), value=0.0).view(out, -1, g)
        lo, hi = wg.amin(-1, keepdim=True).clamp_max(0), wg.amax(-1, keepdim=True).clamp_min(0)
        scale = ((hi - lo) / maxq).clamp_min(1e-8).half().float()
        zero = (-lo / scale).round()
        (wg / scale + zero).round().clamp(0, maxq).to(torch.uint8)


def base_svd_llm(model, args, ratio: float, tok) -> None:
    import torch

    from hf_compress.allocation import uniform_rank
    from hf_compress.calibration import calibration_windows
    from hf_compress.targets import find_targets

    windows = calibration_windows(str(DATA / args.calib), tok, args.nsamples, args.seqlen, 0)
    layers = find_targets(model, TARGETS, [])
    grams = {}

    def hook(name):
        def f(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            grams[name] = grams.get(name, 0) + x.T @ x
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad():
        for batch in windows.split(8):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    for name, m in layers.items():
        w = m.weight.detach().float()
        gram = grams[name].double()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        s, info = torch.linalg.cholesky_ex(gram)
        damp = 1e-6 * gram.diagonal().mean()
        while info:  # the reference's fallback: add to the diagonal until positive definite
            s, info = torch.linalg.cholesky_ex(gram + damp * eye)
            damp *= 10
        s = s.float()
        u, sig, vh = torch.linalg.svd(w @ s, full_matrices=False)
        r = uniform_rank(*w.shape, ratio)
        u[:, :r] * sig[:r], torch.linalg.solve_triangular(s, vh[:r], upper=False, left=False)  # Vᵣ·S⁻¹


def svd_fp32_gap(model, ratio: float = 0.4) -> float:
    """Largest ‖U₃₂V₃₂ − U₆₄V₆₄‖_F / ‖W − U₆₄V₆₄‖_F over the projections: how far plain SVD's fp32 factors are
    from fp64 ones, relative to the truncation error itself (row ``check-svd-fp32``)."""
    from hf_compress.allocation import uniform_rank
    from hf_compress.methods.linalg import truncated_factors

    worst = 0.0
    for w in _weights(model).values():
        r = uniform_rank(*w.shape, ratio)
        (u32, v32), (u64, v64) = truncated_factors(w.float(), r), truncated_factors(w.double(), r)
        p64 = u64 @ v64
        worst = max(worst, float((u32.double() @ v32.double() - p64).norm() / (w.double() - p64).norm()))
    return worst


def run_row(args) -> dict:
    import torch

    import hf_compress
    from hf_compress.evaluation import perplexity
    from hf_compress.loading import load_model, read_text, smollm2_gguf_path
    from hf_compress.summary import layer_table

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(smollm2_gguf_path())
    label = args.row_spec
    kind, *setting = label.split(":")
    row = {"row": label, "threads": args.threads}
    reset_peak_rss()
    t0 = time.time()
    if kind == "check-svd-fp32":
        row["max_gap"] = svd_fp32_gap(model)
    elif kind == "base-svd":
        base_svd(model, args)
    elif kind == "base-rtn":
        base_rtn(model, args, int(setting[0]), int(setting[1]))
    elif kind == "base-svd_llm":
        base_svd_llm(model, args, float(setting[0]), tok)
    else:
        cfg = {"method": kind, "targets": TARGETS,
               "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}}
        if kind in ("rtn", "gptq", "hqq"):
            cfg.update(bits=int(setting[0]), group_size=int(setting[1]))
        else:
            cfg["ratio"] = float(setting[0])
        import logging

        phases = []  # the calibrated engine's "time by phase" line (hf_compress.pipelines.sequential, INFO)
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda rec: phases.append(rec.getMessage()) if rec.getMessage().startswith("time by") else None
        log = logging.getLogger("hf_compress.pipelines.sequential")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        hf_compress.compress(model, cfg, calibration=str(DATA / args.calib), tokenizer=tok, progress=False)
        log.removeHandler(handler)
        if phases:
            row["phases"] = phases[-1].removeprefix("time by phase: ")
    row["seconds"] = round(time.time() - t0, 2)
    row["peak_rss_MB"] = round(peak_rss_mb())
    if not kind.startswith("base-"):
        rows = [r for r in layer_table(model) if r.name.split(".")[-1] in TARGETS]
        row["proj_MB"] = round(sum(r.bytes for r in rows) / 1e6, 1)
        if args.eval_tokens:
            row["ppl"] = perplexity(model, tok, read_text(DATA / "wikitext-2-raw-test.txt"),
                                    max_tokens=args.eval_tokens, progress=False).perplexity
    return row


def table(results: list[dict], eval_tokens: int) -> list[dict]:
    by = {r.get("row", r.get("label")): r for r in results}
    out = []
    for label, (base, target, readme) in ROWS.items():
        if label not in by:
            continue
        r, b = by[label], by.get(base or "", {})
        ratio = r["seconds"] / b["seconds"] if b.get("seconds") else None
        out.append({"method": label, "hf-compress s": r.get("seconds", r.get("error")), "baseline": base or "–",
                    "baseline s": b.get("seconds", "–"), "ratio": round(ratio, 2) if ratio else "–",
                    "target": target, "peak RSS MB": r.get("peak_rss_MB"), "proj MB": r.get("proj_MB"),
                    f"ppl ({eval_tokens} tok)": r.get("ppl", "–"),
                    "README ppl (32768 tok)": readme if readme is not None else "–"})
    return out


# ------------------------------------------------------------------------------------------ Llama-2-7B shape
H, I, HEADS, VOCAB = 4096, 11008, 32, 49152  # vocabulary of SmolLM2's tokenizer, used for calibration
METHODS_7B = {"gptq": ["--bits", "3", "--group-size", "128"], "asvd": ["--ratio", "0.2"],
              "svd_llm": ["--ratio", "0.2"], "svd": ["--ratio", "0.2"]}  # svd: data-free, one layer at a time


def write_llama7b(folder, blocks: int) -> None:
    """A Llama-2-7B-shaped checkpoint with ``blocks`` blocks of random fp16 weights (std 0.02, norms 1), written
    one shard per block so that no more than one block is ever in memory."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_compress.loading import smollm2_gguf_path
    from transformers import AutoTokenizer

    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      num_hidden_layers=blocks, vocab_size=VOCAB, max_position_embeddings=4096, dtype="float16",
                      tie_word_embeddings=False)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    shards: dict[str, dict] = {}
    for name, p in model.state_dict().items():
        key = f"block{name.split('.')[2]}" if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, {})[name] = None
    os.makedirs(folder, exist_ok=True)
    index = {}
    shapes = dict(model.state_dict())
    for k, names in enumerate(shards):
        file = f"model-{k:05d}.safetensors"
        tensors = {}
        for name in shards[names]:
            shape = shapes[name].shape
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.float16)
            else:
                tensors[name] = (torch.randn(shape, generator=g) * 0.02).half()
            index[name] = file
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    cfg.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf_path().parent), gguf_file=smollm2_gguf_path().name)
    tok.save_pretrained(folder)


def formula_mb(method: str, n_tok: int, batch_tok: int) -> dict:
    """Peak memory of one block's compression beyond the process floor (MiB), from what the sequential engine
    holds (H = hidden, I = intermediate, P = 4H² + 3HI parameters of a block):

    * ``block``: the dense block in fp32, P x 4 bytes (accelerate loads an offloaded block's weights for its
      forward; the statistics pass stops inside the block, so they stay loaded while its layers are fitted);
      twice for svd_llm, whose dense copy of the block produces the reference stream (not measured at 7B);
    * ``streams``: the calibration hidden states, n_tok x H x 4 bytes, twice (the compressed stream and the
      block-0 inputs the runner keeps); svd_llm adds the dense reference stream and the dense block's captured
      layer inputs (n_tok x (3H + I) x 4);
    * ``fit``: the largest of (a) one batch's forward intermediates with the Gram being accumulated,
      batch_tok x (3I + 4H) x 4 + I² x 8, and (b) fitting the widest layer (down_proj, I inputs):
      gptq: Gram, damped Hessian, its Cholesky factor and inverse (4 fp64 I x I) plus the weight and its working
      copy (2 x H x I fp32); asvd: the fp64 SVD of the scaled H x I weight (weight, scaled copy, Vᵀ, LAPACK's
      workspace ~ 4 x H x I fp64, U and workspace 2 x H² fp64); svd_llm: 9 fp64 I x I (train and held-out Gram
      and cross, held-out reference Gram, the merged Gram and cross, S and S⁻¹).

    Data-free ``svd`` holds no block, no streams and no forward: one layer at a time, the widest (H x I), is read
    through its offload hook and cloned (fp16, 2 x H x I x 2), made fp32 (H x I x 4) and factored:
    ``torch.linalg.svd`` in fp32 takes 4 x H x I x 4 beyond its input (measured by a one-off probe on 11008 x
    4096: 681 MiB) and the rank-r factors two copies of r(H + I) = 0.8 H·I values at ratio 0.2 (2 x 0.8 x H x I
    x 4): 30.4 x H x I bytes in all.

    peak = floor + block + streams + fit. The floor (interpreter, torch, what stays in RAM such as the
    embeddings) is the CLI's RSS after loading."""
    mb = 2**20
    if method == "svd":
        fit = 2 * H * I * 2 + H * I * 4 + 4 * H * I * 4 + 2 * 0.8 * H * I * 4
        return {"block": 0.0, "streams": 0.0, "forward": 0.0, "fit": fit / mb, "peak": fit / mb}
    p_block = 4 * H * H + 3 * H * I
    block = p_block * 4 * (2 if method == "svd_llm" else 1)  # svd_llm: + the dense copy (copy.deepcopy) of the block
    streams = 2 * n_tok * H * 4 + (n_tok * H * 4 + n_tok * (3 * H + I) * 4 if method == "svd_llm" else 0)
    forward = batch_tok * (3 * I + 4 * H) * 4 + (I * I * 8 if method != "asvd" else 0)
    fit = {"gptq": 4 * I * I * 8 + 2 * H * I * 4,
           "asvd": 4 * H * I * 8 + 2 * H * H * 8,
           "svd_llm": 9 * I * I * 8}[method]
    out = {"block": block / mb, "streams": streams / mb, "forward": forward / mb, "fit": fit / mb}
    out["peak"] = out["block"] + out["streams"] + max(out["forward"], out["fit"])
    return out


def run_llama7b(args) -> None:
    import re
    import shutil
    import subprocess
    import tempfile

    work = tempfile.mkdtemp(prefix="llama7b-", dir=args.workdir)
    model_dir = os.path.join(work, "model")
    t0 = time.time()
    write_llama7b(model_dir, args.llama7b_blocks)
    print(f"wrote {args.llama7b_blocks}-block Llama-2-7B-shaped fp16 checkpoint in {time.time() - t0:.0f}s", flush=True)
    n_tok, batch_tok = args.nsamples * args.seqlen, min(args.nsamples, 8) * args.seqlen
    rows = []
    for method in args.methods_7b:
        out = os.path.join(work, f"out-{method}")
        cmd = [sys.executable, "-m", "hf_compress.cli", "-v", "compress", model_dir, "-o", out, "--method", method,
               *METHODS_7B[method], "--calib", str(DATA / args.calib), "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--device-map", "auto", "--max-memory", "cpu=1GiB",
               "--offload-folder", os.path.join(work, f"offload-{method}")]
        print(f"{method}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)})
        lines, started = [], time.time()
        timed_out = False
        for line in proc.stdout:  # streamed, so a long run shows its progress lines as they come
            lines.append(line)
            if "block" in line or "RSS" in line or "phase" in line or "Error" in line:
                print(f"  [{method} {time.time() - started:.0f}s] {line.rstrip()}", flush=True)
            if args.timeout_7b and time.time() - started > args.timeout_7b:
                proc.kill()
                timed_out = True
                break
        proc.wait()
        log = "".join(lines)
        blocks = [(float(s), float(r)) for s, r in
                  re.findall(rf"{method}: block \d+/\d+ done \(([\d.]+) s\).*peak RSS (\d+) MiB", log)]
        after = re.findall(rf"{method}: block \d+/\d+ done .*, RSS (\d+) MiB, peak", log)  # once each block is done
        saved = re.search(r"saved .*; peak RSS (\d+) MiB, now (\d+) MiB of which (\d+) MiB file pages", log)
        summary = re.search(r"compressed .* in .*\(([\d.]+)s\), peak RSS (\d+) MiB", log)
        if not blocks or (proc.returncode and not timed_out):
            print(f"{method}: FAILED\n{log[-3000:]}", file=sys.stderr, flush=True)
            continue
        floor = re.search(r"RSS now (\d+) MiB", log)
        loading = re.search(r"peak while loading (\d+) MiB", log)  # the CLI restarts the peak after loading
        f = formula_mb(method, n_tok, batch_tok)
        base = float(floor.group(1)) if floor else float("nan")
        predicted = base + f["peak"]
        per_block = sum(s for s, _ in blocks) / len(blocks)
        total = float(summary.group(1)) if summary else time.time() - started
        peak = max(float(summary.group(2)) if summary else 0, max(r for _, r in blocks))
        rows.append({"method": method, "blocks": f"{len(blocks)}/{args.llama7b_blocks}" + (" (timed out)" if timed_out else ""),
                     "s/block": round(per_block, 1), "run s": round(total, 1),
                     # every phase runs once per block (capture, spectra, sensitivity, the sequential pass)
                     "32-block s (extrapolated)": round(32 * (per_block if timed_out else total / len(blocks))),
                     "load peak MiB": loading.group(1) if loading else "-",
                     "peak RSS MiB": round(peak), "floor MiB": round(base),
                     "formula MiB": round(predicted), "measured/formula": round(peak / predicted, 2),
                     **{f"{k} MiB": round(v) for k, v in f.items() if k != "peak"},
                     "RSS after each block MiB": " / ".join(after),
                     # the save reads the finished blocks back: file pages of the checkpoint folder's files
                     "peak incl. save MiB": saved.group(1) if saved else "-",
                     "end: RSS / file pages MiB": f"{saved.group(2)} / {saved.group(3)}" if saved else "-"})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + ".partial", ignore_errors=True)
        shutil.rmtree(os.path.join(work, f"offload-{method}"), ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    if rows:
        print_table(rows, list(rows[0]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llama7b-blocks", type=int, help="measure a Llama-2-7B-shaped model of this many blocks instead")
    p.add_argument("--7b", dest="seven_b", action="store_true", help="the Llama-2-7B-shaped table: --llama7b-blocks 2 "
                   "--nsamples 4 unless given")
    p.add_argument("--shape-7b", type=int, nargs=3, metavar=("HIDDEN", "INTERMEDIATE", "HEADS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--timeout-7b", type=float, default=None, help="seconds per method; a method still running is "
                   "stopped and its finished blocks reported")
    p.add_argument("--methods-7b", nargs="+", default=list(METHODS_7B), choices=list(METHODS_7B))
    p.add_argument("--workdir", default=None, help="where the 7B-shaped checkpoint and offload folders go")
    p.add_argument("--rows", nargs="+", default=DEFAULT, help=f"rows to run (default: {' '.join(DEFAULT)})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", default="gutenberg-pg1342.txt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768, help="0: no perplexity")
    p.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row-spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.shape_7b:  # a smaller model of the same architecture (a quick check of this mode)
        global H, I, HEADS
        H, I, HEADS = args.shape_7b
    if args.seven_b:
        args.llama7b_blocks = args.llama7b_blocks or 2
        if "--nsamples" not in sys.argv:
            args.nsamples = 4
    if args.row:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return
    if args.llama7b_blocks:
        return run_llama7b(args)
    common = ["--threads", str(args.threads), "--calib", args.calib, "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen), "--eval-tokens", str(args.eval_tokens)]
    results = run_rows(__file__, [(r, ["--row-spec", r, *common]) for r in args.rows])
    rows = table(results, args.eval_tokens)
    print_table(rows, list(rows[0]) if rows else ["method"])


if __name__ == "__main__":
    sys.exit(main())
