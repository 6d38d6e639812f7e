"""Shared by the benchmarks: paths, the protocol's targets, peak-RSS accounting, timing, one-process-per-row
running, the SmolLM2 checkpoints the CPU-speed benchmarks load, and `print_table`, the one printer of every
benchmark's result (the machine line, then a Markdown table). Run the benchmarks themselves, not this file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hf_compress.progress import peak_rss_mb, reset_peak_rss  # noqa: F401  (the benchmarks' peak-RSS reading)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: the protocol's compressed layers (../shared/PEERS.md): every q/k/v/o/gate/up/down projection
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def median_ms(fn, n: int = 200, warmup: int = 10) -> float:
    """The median wall time of ``n`` calls of ``fn`` in ms, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[n // 2]


def run_rows(script: str, jobs: list[tuple[str, list[str]]]) -> list[dict]:
    """Run ``script --row <args>`` once per job, each in its own process (so each row's peak RSS is its own);
    print each row's JSON as it lands and return them."""
    results = []
    for label, argv in jobs:
        out = subprocess.run([sys.executable, script, "--row", *argv], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]  # a job may give several rows
        if not lines:
            print(f"{label}: FAILED\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
            results.append({"label": label, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:120]})
            continue
        for line in lines:
            results.append(json.loads(line[4:]))
            print(json.dumps(results[-1]), flush=True)
    return results


#: the instruction-set extensions that decide which CPU paths run (docs/cpu-runtime.md#by-instruction-set)
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")


def machine_line() -> str:
    """The CPU, its ISA flags of note and what torch runs on it: printed with every table (speed is per CPU)."""
    import torch

    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "?":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [f for f in ISA_FLAGS if f in flags]
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return (f"CPU: {model}, {os.cpu_count()} cores; ISA: {' '.join(have) or '?'}; torch {torch.__version__} runs "
            f"{torch.backends.cpu.get_cpu_capability()}" + (f" (forced: ATEN_CPU_CAPABILITY={forced})" if forced else ""))


def print_table(rows: list[dict], cols: list[str] | None = None, *, title: str | None = None,
                formats: dict[str, str] | None = None, right: tuple[str, ...] = ()) -> None:
    """Every benchmark's result goes through here: `machine_line` (speed is per CPU), then ``title`` (the run's
    settings) when given, then a Markdown table of ``rows`` (dicts) with the columns ``cols`` (default: every key
    of the rows, in the order first seen). A float cell is written with ``formats[col]`` (a format spec such as
    ``".2f"``; default ``".4g"``), a missing key or None as an empty cell, anything else with ``str``; the
    columns named in ``right`` are right-aligned."""
    if cols is None:
        cols = list(dict.fromkeys(k for r in rows for k in r))
    formats = formats or {}

    def cell(r: dict, c: str) -> str:
        v = r.get(c)
        if v is None:
            return ""
        if isinstance(v, float):
            return format(v, formats.get(c, ".4g"))
        return str(v)

    print(machine_line())
    if title:
        print(title)
    print("\n| " + " | ".join(cols) + " |\n|" + "".join("---:|" if c in right else "---|" for c in cols))
    for r in rows:
        print("| " + " | ".join(cell(r, c) for c in cols) + " |", flush=True)


# ---------------------------------------------------------------- SmolLM2 checkpoints (decode.py, prefill.py)
def checkpoint_slug(build) -> str:
    """The folder name of a SmolLM2 checkpoint under a benchmark's ``--workdir``: ``dense``, or the config's items
    (``methodrtn-bits4-group_size128``), so that benchmarks building the same config share the folder."""
    if build == "dense":
        return "dense"
    if set(build) == {"model"}:
        return build["model"]  # a dense model other than SmolLM2 (the MoE built from it)
    return "-".join(f"{k}{v}" for k, v in build.items())


#: calibration of the checkpoints that need it (EoRA, calibrated methods): 16 x 512 tokens of gutenberg-pg1342
CHECKPOINT_CALIB = {"nsamples": 16, "seqlen": 512, "seed": 0}


def build_checkpoint(build, out: Path) -> None:
    """SmolLM2-135M from its GGUF, saved as is (``build == "dense"``) or compressed with the hf-compress config
    ``build`` on the protocol's targets (``"lm_head": True`` adds the tied head) and saved: what
    ``hf-compress compress`` writes."""
    import torch

    import hf_compress
    from hf_compress.loading import load_model, smollm2_gguf_path

    torch.manual_seed(0)
    if build != "dense" and "model" in build:
        return _build_moe_checkpoint(build, out)
    model, tok = load_model(smollm2_gguf_path())
    if build == "dense":
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return
    cfg = {**{k: v for k, v in build.items() if k != "lm_head"}, "calibration": CHECKPOINT_CALIB,
           "targets": TARGETS + (["lm_head"] if build.get("lm_head") else [])}  # lm_head: the tied head too
    calibrated = build.get("eora_rank") or build["method"] in ("gptq", "svd_llm", "asvd")
    hf_compress.compress(model, cfg, calibration=str(DATA / "gutenberg-pg1342.txt") if calibrated else None,
                         tokenizer=tok, progress=False)
    hf_compress.save_pretrained(model, out, tokenizer=tok, model_card=False)


#: the MoE models a build may name: SmolLM2 as 8 experts (top-2), and Qwen3-30B-A3B's block shape (hidden 2048, 128
#: experts of 768 neurons, top-8; `moe_scale.build`) with ``SHAPE_BLOCKS`` blocks of random weights
SHAPE_MODEL, SHAPE_BLOCKS = "qwen3-30b-a3b-shape-2blocks", 2
MOE_MODELS = ("moe8-top2", SHAPE_MODEL)


def _build_moe_checkpoint(build: dict, out: Path) -> None:
    """``{"model": "moe8-top2", ...}``: SmolLM2 as 8 experts of 192 neurons, top-2 (`moe_model.moe_from_dense`, the
    router fitted on 32 x 512 tokens of gutenberg-pg1342.txt, as ``moe_model.py --top-k 2`` builds it), saved dense
    into ``out``'s folder as ``moe8-top2`` first (``SHAPE_MODEL``: the random Qwen3-30B-A3B-shaped blocks); with a config besides, that model compressed on the default
    targets (q/k/v/o and every expert's ``gate_up_proj`` / ``down_proj``; the router dense; ``"lm_head": True``:
    the tied head too)."""
    import hf_compress
    from hf_compress.calibration import calibration_windows
    from hf_compress.loading import load_model, smollm2_gguf_path

    if build["model"] not in MOE_MODELS:
        raise ValueError(f"unknown model {build['model']!r} (known: {', '.join(MOE_MODELS)})")
    source = out.parent / build["model"]
    if build["model"] == SHAPE_MODEL and not (source / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from moe_scale import build as build_shape

        build_shape(source, SHAPE_BLOCKS)  # random bf16 weights at Qwen3-30B-A3B's block shape
        load_model(smollm2_gguf_path())[1].save_pretrained(source)  # a tokenizer for the prompt (ids % vocab)
    elif not (source / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from moe_model import moe_from_dense

        model, tok = load_model(smollm2_gguf_path())
        cal = calibration_windows(str(DATA / "gutenberg-pg1342.txt"), tok, 32, 512, 0)
        moe_from_dense(model.eval(), 8, 2, cal).save_pretrained(source)
        tok.save_pretrained(source)
        del model
    cfg = {k: v for k, v in build.items() if k not in ("model", "lm_head")}
    if not cfg:
        return
    model, tok = load_model(source)
    if build.get("lm_head"):
        cfg["targets"] = ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "lm_head"]
    hf_compress.compress(model, {**cfg, "calibration": CHECKPOINT_CALIB}, progress=False)
    hf_compress.save_pretrained(model, out, tokenizer=tok, model_card=False)


def ensure_checkpoints(builds, workdir: Path) -> None:
    """Build the checkpoints of ``builds`` missing under ``workdir`` (reused when there), each in its own process
    (so the caller's memory and allocator stay as they were)."""
    here = str(Path(__file__).resolve().parent)
    for build in builds:
        out = Path(workdir) / checkpoint_slug(build)
        if (out / "config.json").exists():
            continue
        print(f"building {out} ...", file=sys.stderr, flush=True)
        code = (f"import json, sys; sys.path.insert(0, {here!r}); from pathlib import Path; import common; "
                f"common.build_checkpoint(json.loads({json.dumps(build)!r}), Path({str(out)!r}))")
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       stdin=subprocess.DEVNULL)
