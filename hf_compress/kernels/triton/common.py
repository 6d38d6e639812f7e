"""Helpers shared by the Triton kernels (imported only when the Triton path runs; needs ``triton``).

Autotuning: every kernel has a short config list per shape regime and ``triton.autotune`` keyed on
(M-bucket, N, K[, R]) plus the argument dtypes; the winners are kept in memory for the process and, off the
interpreter, on disk in Triton's cache (``cache_results=True``), so a new process does not re-tune. Under
``TRITON_INTERPRET=1`` (CPU tests) each kernel gets exactly one config: the autotuner then never benchmarks.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

#: True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1`` before triton was imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program ``pid`` in grouped order: GROUP_M row tiles sweep the columns together,
    so the operand tiles they share stay in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows


def m_bucket(m: int) -> int:
    """The autotuning bucket of a row count: 1 (GEMV), <=16, <=64, <=256, <=1024, more."""
    for b in (1, 16, 64, 256, 1024):
        if m <= b:
            return b
    return 4096


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs follow torch's own TF32 switch (off by default), so the kernel
    gives the numbers ``F.linear`` would; fp16/bf16 are exact products either way."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dots(*dtypes: torch.dtype) -> bool:
    """The interpreter's ``tl.dot`` misreads bf16 operands (numpy has no bf16): feed it fp32 there instead."""
    return INTERPRET and torch.bfloat16 in dtypes


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> contiguous [M, K]."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def device_ctx(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def autotuned(jit_fn, configs, key, interp=None, **kw):
    """``triton.autotune`` over ``configs``; under the interpreter only ``interp`` (default: the first config),
    so nothing is benchmarked there."""
    if INTERPRET:
        configs = [interp or configs[0]]
    return triton.autotune(configs=configs, key=key, cache_results=not INTERPRET, **kw)(jit_fn)


def cfg(num_warps=4, num_stages=2, **kwargs) -> triton.Config:
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def launch(autotuner, jit_fn, grid, args, kwargs, config: dict | None):
    """Run ``autotuner`` (``config`` None) or ``jit_fn`` with an explicit config dict (tests and benchmarks:
    ``num_warps``/``num_stages`` keys are launch options, the rest constexprs)."""
    if config is None:
        return autotuner[grid](*args, **kwargs)
    return jit_fn[grid](*args, **kwargs, **config)
