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
with accelerate disk offload, each method in its own process through the Python API, as ``hf-compress compress
--device-map auto --max-memory cpu=1GiB --offload-folder DIR`` does (`run_llama7b_method`): per block time and peak
RSS for svd_llm, asvd, gptq and (data-free) svd from the library's progress records, beside the memory formula
(`formula_mb`) and the extrapolation to 32 blocks; the RSS once each block is done (finished blocks are read back
from the checkpoint folder, memory-mapped, rather than kept in RAM) and the peak including the save.

    .venv/bin/python benchmarks/compress_cost.py --threads 1 --7b --methods-7b gptq --timeout-7b 1200
    .venv/bin/python benchmarks/compress_cost.py --llama7b-blocks 1 --shape-7b 256 688 4 --nsamples 2 --seqlen 64 \
        --methods-7b gptq svd                                      # a quick check of this mode on a small shape

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
from dataclasses import dataclass

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
@dataclass(frozen=True)
class Shape:
    """A Llama model's widths: Llama-2-7B's by default (vocabulary of SmolLM2's tokenizer, used for calibration)."""

    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    vocab: int = 49152


#: method -> its hf-compress config in the 7B-shaped run (svd: data-free, one layer at a time)
METHODS_7B = {"gptq": {"bits": 3, "group_size": 128}, "asvd": {"ratio": 0.2}, "svd_llm": {"ratio": 0.2},
              "svd": {"ratio": 0.2}}
#: the placement of the 7B-shaped run: accelerate's big-model loading, everything past 1 GiB of RAM on disk
MAX_MEMORY_7B = {"cpu": "1GiB"}


def write_llama7b(folder, blocks: int, shape: Shape = Shape()) -> None:
    """A Llama-2-7B-shaped checkpoint with ``blocks`` blocks of random fp16 weights (std 0.02, norms 1), written
    one shard per block so that no more than one block is ever in memory."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_compress.loading import smollm2_gguf_path

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.heads, num_hidden_layers=blocks,
                      vocab_size=shape.vocab, max_position_embeddings=4096, dtype="float16", tie_word_embeddings=False)
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
            size = shapes[name].shape
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(size, dtype=torch.float16)
            else:
                tensors[name] = (torch.randn(size, generator=g) * 0.02).half()
            index[name] = file
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    cfg.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf_path().parent), gguf_file=smollm2_gguf_path().name)
    tok.save_pretrained(folder)


def formula_mb(method: str, n_tok: int, batch_tok: int, shape: Shape = Shape()) -> dict:
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
    embeddings) is the RSS after loading."""
    H, I = shape.hidden, shape.intermediate  # noqa: E741
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


def _event(kind: str, **fields) -> None:
    """One line the parent reads as it comes (a 7B-shaped row takes many minutes): ``EVENT {json}``."""
    print("EVENT " + json.dumps({"event": kind, **fields}), flush=True)


def run_llama7b_method(args) -> None:
    """Child process of one 7B-shaped row: what ``hf-compress -v compress MODEL -o OUT --method M ... --device-map
    auto --max-memory cpu=1GiB --offload-folder DIR`` does, through the Python API (load with accelerate's
    placement; RSS after loading, then the peak restarted; ``compress`` with a checkpoint folder beside the output,
    so that finished blocks leave RAM; the save), reporting as events: the load, every finished block (the
    library's progress records: time, RSS once done, peak so far), the time by phase, the compression and the save."""
    import logging
    import shutil

    import hf_compress
    from hf_compress.loading import load_model
    from hf_compress.progress import rss_mb
    from hf_compress.summary import size_breakdown

    method = args.row_7b
    out = os.path.join(args.work_7b, f"out-{method}")
    partial = out + ".partial"

    class Events(logging.Handler):
        def emit(self, record):
            if record.name == "hf_compress.progress":  # Progress: (what, unit, k, n, seconds, elapsed, eta, rss, peak)
                what, unit, k, n, seconds, _, _, rss, peak = record.args
                _event("unit", what=what, unit=unit, k=k, n=n, s=round(seconds, 1), rss=round(rss), peak=round(peak))
            elif record.getMessage().startswith("time by phase"):
                _event("phases", text=record.getMessage().removeprefix("time by phase: "))

    handler = Events(logging.INFO)
    for name in ("hf_compress.progress", "hf_compress.pipelines.sequential"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    t0 = time.time()
    model, tok = load_model(args.model_7b, device_map="auto", max_memory=MAX_MEMORY_7B,
                            offload_folder=os.path.join(args.work_7b, f"offload-{method}"))
    placement = getattr(model, "hf_device_map", None) or {}
    _event("loaded", s=round(time.time() - t0, 1), rss=round(rss_mb()), peak=round(peak_rss_mb()),
           placement={d: sum(1 for v in placement.values() if v == d) for d in dict.fromkeys(placement.values())})
    reset_peak_rss()  # the peaks from here on are the compression's (and the save's)
    config = {"method": method, **METHODS_7B[method],
              "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0, "source": args.calib}}
    t0 = time.time()
    hf_compress.compress(model, config, calibration=str(DATA / args.calib), tokenizer=tok, progress=False,
                         checkpoint_dir=partial)
    sizes = size_breakdown(model)
    _event("compressed", s=round(time.time() - t0, 1), peak=round(peak_rss_mb()), layers=sizes["compressed_layers"],
           bytes_dense=sizes["compressed_dense"], bytes_now=sizes["compressed_now"])
    hf_compress.save_pretrained(model, out, tokenizer=tok)
    shutil.rmtree(partial, ignore_errors=True)
    _event("saved", peak=round(peak_rss_mb()), rss=round(rss_mb()), file_pages=round(rss_mb("RssFile")))


def run_llama7b(args, shape: Shape) -> None:
    import shutil
    import subprocess
    import tempfile

    work = tempfile.mkdtemp(prefix="llama7b-", dir=args.workdir)
    model_dir = os.path.join(work, "model")
    t0 = time.time()
    write_llama7b(model_dir, args.llama7b_blocks, shape)
    print(f"wrote {args.llama7b_blocks}-block Llama-2-7B-shaped fp16 checkpoint in {time.time() - t0:.0f}s", flush=True)
    n_tok, batch_tok = args.nsamples * args.seqlen, min(args.nsamples, 8) * args.seqlen
    rows = []
    for method in args.methods_7b:
        cmd = [sys.executable, __file__, "--row-7b", method, "--model-7b", model_dir, "--work-7b", work,
               "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        print(f"{method}: {METHODS_7B[method]}, offloaded ({MAX_MEMORY_7B}), {args.nsamples} x {args.seqlen} tokens",
              flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)})
        events, lines, started = [], [], time.time()
        timed_out = False
        for line in proc.stdout:  # streamed, so a long run shows its progress as it comes
            lines.append(line)
            if line.startswith("EVENT "):
                events.append(json.loads(line[6:]))
                print(f"  [{method} {time.time() - started:.0f}s] {line[6:].rstrip()}", flush=True)
            if args.timeout_7b and time.time() - started > args.timeout_7b:
                proc.kill()
                timed_out = True
                break
        proc.wait()
        of = lambda kind: [e for e in events if e["event"] == kind]  # noqa: E731
        blocks = [e for e in of("unit") if e["what"] == method]
        loaded, done, saved = (of("loaded") or [None])[0], (of("compressed") or [None])[0], (of("saved") or [None])[0]
        if not blocks or (proc.returncode and not timed_out):
            print(f"{method}: FAILED\n{''.join(lines)[-3000:]}", file=sys.stderr, flush=True)
            continue
        f = formula_mb(method, n_tok, batch_tok, shape)
        base = float(loaded["rss"]) if loaded else float("nan")
        predicted = base + f["peak"]
        per_block = sum(e["s"] for e in blocks) / len(blocks)
        total = done["s"] if done else time.time() - started
        peak = max(done["peak"] if done else 0, max(e["peak"] for e in blocks))
        rows.append({"method": method, "blocks": f"{len(blocks)}/{args.llama7b_blocks}" + (" (timed out)" if timed_out else ""),
                     "s/block": round(per_block, 1), "run s": round(total, 1),
                     # every phase runs once per block (capture, spectra, sensitivity, the sequential pass)
                     "32-block s (extrapolated)": round(32 * (per_block if timed_out else total / len(blocks))),
                     "load peak MiB": loaded["peak"] if loaded else "-",
                     "peak RSS MiB": round(peak), "floor MiB": round(base),
                     "formula MiB": round(predicted), "measured/formula": round(peak / predicted, 2),
                     **{f"{k} MiB": round(v) for k, v in f.items() if k != "peak"},
                     "RSS after each block MiB": " / ".join(str(e["rss"]) for e in blocks),
                     # the save reads the finished blocks back: file pages of the checkpoint folder's files
                     "peak incl. save MiB": saved["peak"] if saved else "-",
                     "end: RSS / file pages MiB": f"{saved['rss']} / {saved['file_pages']}" if saved else "-"})
        print(json.dumps(rows[-1]), flush=True)
        out = os.path.join(work, f"out-{method}")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + ".partial", ignore_errors=True)
        shutil.rmtree(os.path.join(work, f"offload-{method}"), ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    print_table(rows, title=f"\nLlama-shaped model (hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.heads} "
                            f"heads, vocabulary {shape.vocab}), {args.llama7b_blocks} blocks, placed with max_memory "
                            f"{MAX_MEMORY_7B}; {args.nsamples} x {args.seqlen} calibration tokens, {args.threads} threads")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llama7b-blocks", type=int, help="measure a Llama-2-7B-shaped model of this many blocks instead")
    p.add_argument("--7b", dest="seven_b", action="store_true", help="the Llama-2-7B-shaped table: --llama7b-blocks 2 "
                   "--nsamples 4 unless given")
    p.add_argument("--shape-7b", type=int, nargs=3, metavar=("HIDDEN", "INTERMEDIATE", "HEADS"),
                   help="another width for the 7B-shaped model (a quick check of that mode)")
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
    p.add_argument("--row-7b", help=argparse.SUPPRESS)
    p.add_argument("--model-7b", help=argparse.SUPPRESS)
    p.add_argument("--work-7b", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row_7b:
        return run_llama7b_method(args)
    # --shape-7b: a smaller model of the same architecture (a quick check of this mode)
    shape = Shape(*args.shape_7b) if args.shape_7b else Shape()
    if args.seven_b:
        args.llama7b_blocks = args.llama7b_blocks or 2
        if "--nsamples" not in sys.argv:
            args.nsamples = 4
    if args.row:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return
    if args.llama7b_blocks:
        return run_llama7b(args, shape)
    common = ["--threads", str(args.threads), "--calib", args.calib, "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen), "--eval-tokens", str(args.eval_tokens)]
    results = run_rows(__file__, [(r, ["--row-spec", r, *common]) for r in args.rows])
    rows = table(results, args.eval_tokens)
    print_table(rows, title=f"\nSmolLM2-135M, {args.threads} threads, calibration {args.nsamples} x {args.seqlen} "
                            f"tokens of {args.calib}")


if __name__ == "__main__":
    sys.exit(main())
