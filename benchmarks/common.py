"""Shared by the SmolLM2 benchmarks: paths, the protocol's targets, peak-RSS accounting, one-process-per-row
running and the Markdown table. Run the benchmarks themselves, not this file."""

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


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def print_table(results: list[dict], cols: list[str]) -> None:
    print(machine_line())
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")
