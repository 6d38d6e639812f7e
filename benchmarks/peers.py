"""The strongest quantization peers beside our rows, on one protocol, in one table.

    .venv/bin/python benchmarks/peers.py --rows llmc-gptq:3:64 gptq:3:64          # a peer row and ours
    .venv/bin/python benchmarks/peers.py --rows llmc-gptq:3:64 llmc-awq:3:64 autoround:3:64 gptq:3:64 gptq:avg3.0:64
    .venv/bin/python benchmarks/peers.py --install-only                          # create the peers' environments

Peers (each in its own virtual environment under ``--venv-root``, default ``~/.cache/hf-compress-peers``, created
with ``pip`` on first use — they pin other transformers versions than ours; the llm-compressor environment pulls
torch with its CUDA wheels, several GB):

* ``llmc-gptq:BITS:GROUP`` — llm-compressor 0.14 ``oneshot`` with ``GPTQModifier`` (asymmetric int, group strategy,
  ``actorder="weight"``, min-max observer), every q/k/v/o/gate/up/down projection;
* ``llmc-awq:BITS:GROUP`` — llm-compressor 0.14 ``oneshot`` with ``AWQModifier`` (same scheme, its Llama mappings);
* ``autoround:BITS:GROUP`` — auto-round (``AutoRound(...).quantize()``, asymmetric, ``--autoround-iters``
  iterations, default 200 as the library; 50 for a CPU budget).

Any other row is one of ours, exactly as ``benchmarks/quant.py`` runs it (``gptq:3:64``, ``gptq:avg3.0:64``,
``gptq+rot+act:3:64``, ``rtn:4:128``...).

Protocol (../shared/PEERS.md): SmolLM2-135M-Instruct fp32 from its GGUF (written once by us as a plain
transformers checkpoint under ``--venv-root``/protocol, which every peer loads); perplexity on the first
``--eval-tokens`` (32768) tokens of WikiText-2 raw test in 512-token windows, computed in each environment by the
same computation as ours (`hf_compress.evaluation.perplexity`) on the same token ids; calibration: the same 32 × 512 windows of gutenberg-pg1342.txt (seed 0) that our
rows use, given to every library as token ids. ``bits_w``: bits per weight of the quantized layers *as stored* in
each library's own saved checkpoint (codes, scales, zero points, group indices; biases excluded), so a layer a
library left in 16 bits (AutoRound skips shapes it cannot pack) shows there. ``compress_s``:
wall time of the library's compression call on this machine. Peers are data-dependent: AutoRound on 2 CPU cores
takes hours at its default iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import DATA, TARGETS, print_table, run_rows

HERE = Path(__file__).resolve().parent
WORKER = HERE / "peers_worker.py"
#: environment name -> the pip requirements it is created with
VENVS = {"llm-compressor": ["llmcompressor==0.14.*"], "auto-round": ["auto-round"]}
#: row prefix -> (environment, library label)
PEERS = {"llmc-gptq": ("llm-compressor", "llm-compressor 0.14 GPTQ"),
         "llmc-awq": ("llm-compressor", "llm-compressor 0.14 AWQ"),
         "autoround": ("auto-round", "AutoRound")}


def venv_python(root: Path, name: str, install: bool = True) -> Path:
    """The interpreter of environment ``name`` under ``root``, created and installed when absent."""
    env = root / name
    python = env / "bin" / "python"
    marker = env / ".hf-compress-installed"
    if marker.exists():
        return python
    if not install:
        raise SystemExit(f"{env} is not installed; run without --no-install (or with --install-only) first")
    if not python.exists():
        print(f"creating {env}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    print(f"installing {VENVS[name]} into {env} (large downloads)", file=sys.stderr, flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *VENVS[name]], check=True)
    version = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    marker.write_text(version)
    return python


def prepare_protocol(root: Path, nsamples: int, eval_tokens: int, calib: str) -> Path:
    """Write (once) the protocol's shared inputs under ``root``/protocol: the SmolLM2 fp32 checkpoint and tokenizer,
    ``calib.pt`` (the [nsamples, 512] calibration windows our rows use) and ``eval.pt`` (the WikiText-2 token ids)."""
    import torch

    from hf_compress.calibration import calibration_windows
    from hf_compress.loading import load_model, read_text, smollm2_gguf_path

    out = root / "protocol"
    model_dir, calib_file = out / "smollm2-fp32", out / f"calib-{Path(calib).stem}-{nsamples}x512.pt"
    eval_file = out / f"wikitext-{eval_tokens}.pt"
    if model_dir.exists() and calib_file.exists() and eval_file.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(smollm2_gguf_path())
    if not model_dir.exists():
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    windows = calibration_windows(str(DATA / calib), tok, nsamples, 512, 0)
    torch.save(windows, calib_file)
    ids = tok(read_text(DATA / "wikitext-2-raw-test.txt"), return_tensors="pt",
              add_special_tokens=False)["input_ids"][0][:eval_tokens].clone()  # not the whole text's storage
    torch.save(ids, eval_file)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["llmc-gptq:3:64", "llmc-awq:3:64", "autoround:3:64", "gptq:3:64"])
    p.add_argument("--venv-root", default=os.path.expanduser("~/.cache/hf-compress-peers"))
    p.add_argument("--calib", default="gutenberg-pg1342.txt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--autoround-iters", type=int, default=200)
    p.add_argument("--install-only", action="store_true", help="create the peers' environments and stop")
    p.add_argument("--no-install", action="store_true", help="refuse to create a missing environment")
    args = p.parse_args()
    root = Path(args.venv_root)
    if args.install_only:
        for name in VENVS:
            print(venv_python(root, name))
        return
    rows = [r for r in args.rows]
    peers = [r for r in rows if r.split(":")[0] in PEERS]
    ours = [r for r in rows if r not in peers]
    results = []
    if peers:
        protocol = prepare_protocol(root, args.nsamples, args.eval_tokens, args.calib)
        for text in peers:
            name, bits, group = text.split(":")
            env, label = PEERS[name]
            spec = {"peer": name, "method": label, "bits": int(bits), "group_size": int(group),
                    "model": str(protocol / "smollm2-fp32"), "targets": TARGETS,
                    "calib": str(protocol / f"calib-{Path(args.calib).stem}-{args.nsamples}x512.pt"),
                    "eval": str(protocol / f"wikitext-{args.eval_tokens}.pt"),
                    "iters": args.autoround_iters, "out": str(root / "outputs" / f"{name}-w{bits}g{group}")}
            python = venv_python(root, env, install=not args.no_install)
            t0 = time.time()
            run = subprocess.run([str(python), str(WORKER), json.dumps(spec)], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
                                 stdin=subprocess.DEVNULL)
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("ROW ")]
            if not lines:
                print(f"{text}: FAILED after {time.time() - t0:.0f} s\n{run.stderr[-3000:]}", file=sys.stderr,
                      flush=True)
                results.append({"method": label, "bits": bits, "group_size": group,
                                "error": (run.stderr.strip().splitlines() or ["?"])[-1][:160]})
                continue
            results.append(json.loads(lines[-1][4:]))
            print(json.dumps(results[-1]), flush=True)
    if ours:
        import quant

        base = {"calib": args.calib, "nsamples": args.nsamples, "eval_tokens": args.eval_tokens, "extra_eval": [],
                "extra_eval_tokens": 0}
        specs = [quant._parse_row(r) for r in ours]
        jobs = [(r, [json.dumps({**base, **s})]) for r, s in zip(ours, specs)]
        for row in run_rows(str(HERE / "quant.py"), jobs):
            results.append({**row, "method": f"hf-compress {row.get('method', '')}".strip()})
    print_table(results, ["method", "bits", "group_size", "widths", "bits_w", "ppl_wikitext", "compress_s", "versions",
                          "error"],
                title=f"\nSmolLM2-135M fp32, perplexity on the first {args.eval_tokens} tokens of WikiText-2 raw test "
                      f"(512-token windows); calibration {args.nsamples} x 512 tokens of {args.calib} (seed 0), the "
                      "same windows for every library; bits_w as stored")


if __name__ == "__main__":
    sys.exit(main())
