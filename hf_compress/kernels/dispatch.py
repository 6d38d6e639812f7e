"""Choose between the Triton kernels, the CPU kernels and the torch references: one dispatch for the weights'
kernels (`quant_linear`, `lowrank_linear`) and the KV cache's (`kv_quantize`, `kv_dequantize`).

``HF_COMPRESS_KERNELS`` = ``auto`` (default: Triton for CUDA tensors when Triton is importable, the CPU kernels
(`kernels.cpu.weights`) for CPU tensors when this torch has them, the reference otherwise), ``torch`` (always the
reference: the specification), ``triton`` (always Triton; an error where it cannot run: Triton missing, or CPU
tensors without ``TRITON_INTERPRET=1`` set before triton was imported) or ``cpu`` (always the CPU kernels; an error
for other devices or a torch without them).

The CPU backend runs `QuantLinear` (`kernels.cpu.weights`; a layer whose group size the kernel cannot take, or a
call without a ``cache`` to keep the repacked weight in, runs the reference); low-rank layers are the reference's two
dense GEMMs, with an fp32 U read from a copy held by columns (`cpu.lowrank_columns`, kept in the ``cache``:
`kernels.cache.reuse`).

The KV cache (layout: `kernels.reference.kv`) follows the same variable with the same semantics (`kv_backend`):
``auto`` takes Triton for CUDA tensors (2/4/8 bits; 3-bit codes run the reference) and the CPU dequantize fast path
`kernels.cpu.kv` for CPU tensors, ``cpu`` that fast path, ``torch`` the reference, ``triton`` Triton wherever it can
run.

The variable is read once per process (the first forward) and cached, as is the Triton import;
`refresh_backend()` re-reads both (tests, or after changing the variable at run time).

Autograd: the kernels have no backward of their own. When a gradient is needed (grad mode on and an input
requires grad, e.g. PEFT training of the low-rank factors) the Triton forward is wrapped in an
``autograd.Function`` whose backward recomputes the reference and differentiates it, so gradients are the
reference's.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

from .cache import reuse
from .cpu import kv as cpu_kv
from .cpu import weights as cpu
from .cpu.paging import release_freed_memory
from .reference import weights as reference
from .reference.kv import _check, dequantize_reference, quantize_reference

ENV_VAR = "HF_COMPRESS_KERNELS"
CHOICES = ("auto", "torch", "triton", "cpu")

_import_error: str | None = None


@functools.lru_cache(maxsize=1)
def kernel_mode() -> str:
    """The value of ``HF_COMPRESS_KERNELS`` (validated), read once per process; see `refresh_backend`."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be auto, torch, triton or cpu, got {choice!r}")
    return choice


@functools.lru_cache(maxsize=1)
def _triton():
    """The Triton kernel modules (weights and KV cache: one cache, cleared by `refresh_backend`), or None when
    triton is missing or broken (the reference serves then)."""
    global _import_error
    try:
        from .triton import common, kv, lowrank, weights
    except Exception as e:  # noqa: BLE001 - ImportError, or a triton that fails to initialise
        _import_error = f"{type(e).__name__}: {e}"
        return None
    _import_error = None
    return SimpleNamespace(common=common, lowrank=lowrank, quant=weights, kv=kv)


def triton_available() -> bool:
    return _triton() is not None


#: bumped by `refresh_backend`: a `decode_path` made before answers stale
_GENERATION = [0]


def refresh_backend() -> str:
    """Forget the cached choice and Triton import, re-read ``HF_COMPRESS_KERNELS``; returns the new mode."""
    kernel_mode.cache_clear()
    _triton.cache_clear()
    _GENERATION[0] += 1
    return kernel_mode()


def backend_for(tensor: torch.Tensor) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"``: which implementation runs for an input living where ``tensor`` lives."""
    mode = kernel_mode()
    if mode == "torch":
        return "torch"
    on_cpu = tensor.device.type == "cpu"
    if mode == "auto":  # triton is imported only for CUDA inputs
        if tensor.is_cuda:
            return "triton" if _triton() is not None else "torch"
        return "cpu" if on_cpu and cpu.available() else "torch"
    if mode == "cpu":
        if not on_cpu or not cpu.available():
            raise RuntimeError(f"{ENV_VAR}=cpu with a {tensor.device.type} tensor" if not on_cpu else
                               f"{ENV_VAR}=cpu but this torch ({torch.__version__}) lacks aten.{' / aten.'.join(cpu.OPS)}")
        return "cpu"
    checked_triton(tensor)
    return "triton"


def checked_triton(tensor: torch.Tensor) -> SimpleNamespace:
    """The Triton kernel modules for ``HF_COMPRESS_KERNELS=triton``; raises, naming the problem, where they cannot run
    for ``tensor`` (Triton not importable, or a CPU tensor outside the interpreter)."""
    mods = _triton()
    if mods is None:
        raise RuntimeError(f"{ENV_VAR}=triton but Triton is not importable ({_import_error})")
    if not tensor.is_cuda and not mods.common.INTERPRET:
        raise RuntimeError(f"{ENV_VAR}=triton with a {tensor.device.type} tensor: Triton runs on CUDA tensors, or on "
                           "CPU under TRITON_INTERPRET=1 (set before triton is imported); use auto or torch here")
    return mods


class _KernelFn(torch.autograd.Function):
    """Triton forward, reference backward (recomputed and differentiated with autograd)."""

    @staticmethod
    def forward(ctx, kernel, ref, *tensors):
        ctx.ref = ref
        ctx.save_for_backward(*tensors)
        return kernel(*tensors)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        inputs = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(saved, needs)]
        with torch.enable_grad():
            out = ctx.ref(*inputs)
        wrt = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
        return (None, None, *[next(grads) if need else None for need in needs])


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run(kernel, ref, *tensors):
    if _needs_grad(*tensors):
        return _KernelFn.apply(kernel, ref, *tensors)
    return kernel(*tensors)


def cpu_pack(cache: dict, qweight, scales, zeros, bits: int, group_size: int, in_features: int) -> cpu.Int4Pack:
    """The layer's `cpu.repack`, kept in ``cache`` (`kernels.cache.reuse`); the repack's temporaries are handed back to
    the OS (`kernels.cpu.paging.release_freed_memory`)."""
    def build():
        pack = cpu.repack(qweight, scales, zeros, bits, group_size, in_features)
        release_freed_memory()
        return pack

    return reuse(cache, "pack", (qweight, scales, zeros), build)


def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   cache: dict | None = None) -> torch.Tensor:
    """y = (x · Vᵀ) · Uᵀ + b. ``cache``: where the CPU backend keeps an fp32 U by columns (`cpu.lowrank_columns`)
    between calls; without one, or when a gradient is needed, it runs the reference on U as it is."""
    backend = backend_for(x)
    if backend == "triton":
        return _run(_triton().lowrank.lowrank_linear, reference.lowrank_linear, x, u, v, bias)
    if (backend == "cpu" and cache is not None and u.dtype is torch.float32 and u.device.type == "cpu"
            and not _needs_grad(x, u, v, bias)):
        u = reuse(cache, "u_columns", (u,), lambda: cpu.lowrank_columns(u))
    return reference.lowrank_linear(x, u, v, bias)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, in_features: int, bias: torch.Tensor | None = None,
                 u: torch.Tensor | None = None, v: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
    """y = x · dequant(Q)ᵀ + (x · Vᵀ) · Uᵀ + b (layout: `hf_compress.kernels.reference.weights`). ``cache``: where
    the CPU backend keeps the repacked weight between calls (`cpu_pack`); without one the CPU backend runs the
    reference."""
    backend = backend_for(x)
    if (backend == "cpu" and cache is not None and cpu.supports(bits, group_size)
            and not _needs_grad(x, bias, u, v)):  # no backward of its own: training runs the reference
        pack = cpu_pack(cache, qweight, scales, zeros, bits, group_size, in_features)
        return cpu.quant_linear(x, pack, bias, u, v)
    if backend == "triton":
        packed = (qweight, scales, zeros, bits, group_size, in_features)

        def kernel(x_, bias_, u_, v_):
            return _triton().quant.quant_linear(x_, *packed, bias_, u_, v_)

        def ref(x_, bias_, u_, v_):
            return reference.quant_linear(x_, *packed, bias_, u_, v_)

        return _run(kernel, ref, x, bias, u, v)
    return reference.quant_linear(x, qweight, scales, zeros, bits, group_size, in_features, bias, u, v)


def decode_path(x: torch.Tensor, buffers: dict, bits: int, group_size: int, in_features: int, cache: dict):
    """The CPU kernel's decode path for a layer whose packed buffers ``buffers`` holds (``qweight``, ``scales``,
    ``zeros``: a module's ``_buffers``), resolved once for inputs like ``x``: ``(fits, run)``, or None where
    `quant_linear` would not run the CPU kernel for ``x`` (another backend, a group size the kernel cannot take).
    It is kept in ``cache`` beside the pack (dropped with it) and gives the same result as `quant_linear` bit for bit.

    ``fits(buffers, x)``: True when ``run(x, bias, u, v)`` may serve the call (decode-sized ``x`` on the CPU with
    the layer's K: `cpu.decoder`); False when ``x`` is not such an input (the general path serves it, the decode
    path stays); None when the path is stale: a buffer replaced, changed in place or given other data (as
    `kernels.cache.reuse` sees it: ``.to()``, loading a state dict, a new quantization) or the backend re-read
    (`refresh_backend`). The caller runs neither path under autograd (no backward of its own) and passes ``bias``,
    ``u`` and ``v`` as they are at the call."""
    if backend_for(x) != "cpu" or not cpu.supports(bits, group_size):
        return None
    q, s, z = buffers["qweight"], buffers["scales"], buffers["zeros"]
    run = cpu.decoder(cpu_pack(cache, q, s, z, bits, group_size, in_features))
    generation, limit, k = _GENERATION[0], run.rows * in_features, in_features
    qp, sp, zp = q.data_ptr(), s.data_ptr(), z.data_ptr()
    qv, sv, zv = (None if t.is_inference() else t._version for t in (q, s, z))

    def fits(buffers: dict, x: torch.Tensor):
        if (buffers["qweight"] is not q or buffers["scales"] is not s or buffers["zeros"] is not z
                or _GENERATION[0] != generation or q.data_ptr() != qp or s.data_ptr() != sp or z.data_ptr() != zp
                or (qv is not None and q._version != qv) or (sv is not None and s._version != sv)
                or (zv is not None and z._version != zv)):
            return None
        return x.is_cpu and x.shape[-1] == k and x.numel() < limit

    cache["decode"] = (fits, run)
    return fits, run


# ----------------------------------------------------------------------------------------------- KV cache
TRITON_BITS = (2, 4, 8)  # widths the Triton kernels cover; 3-bit codes always run the torch reference


def kv_backend(x: torch.Tensor, bits: int | None = None) -> str:
    """"triton", "cpu" or "torch" for tensor ``x`` (and, when given, a width: one the Triton kernels do not cover runs
    on CPU tensors' fast path or the reference). ``cpu`` (`kernels.cpu.kv`) is a dequantize fast path only:
    quantizing runs the reference on CPU. A mode that cannot run for ``x`` raises as
    `backend_for` does (``cpu`` with a CUDA tensor, ``triton`` without Triton or with a
    CPU tensor outside the interpreter) instead of quietly running the reference."""
    choice = kernel_mode()
    if choice == "torch":
        return "torch"
    on_cpu = x.device.type == "cpu"
    if choice == "cpu":
        if not on_cpu:
            raise RuntimeError(f"{ENV_VAR}=cpu with a {x.device.type} tensor: the CPU KV fast path runs on CPU "
                               "tensors; use auto or torch here")
        return "cpu"
    if choice == "triton":
        checked_triton(x)
        return "triton" if bits is None or bits in TRITON_BITS else "torch"
    if x.is_cuda and _triton() is not None and (bits is None or bits in TRITON_BITS):
        return "triton"
    return "cpu" if on_cpu else "torch"


def kv_quantize(x: torch.Tensor, bits: int, group: int, axis: str, scale_dtype=torch.float16):
    """x [..., T, C] -> (codes uint8 [..., T, C*bits/8], scale, mn) — layout: `kernels.reference.kv`."""
    if kv_backend(x, bits) == "triton":
        _check(bits, group, axis, x.shape)
        return _triton().kv.quantize(x, bits, group, axis, scale_dtype)
    return quantize_reference(x, bits, group, axis, scale_dtype)


def kv_dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group: int, axis: str,
                  dtype=torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens ``codes`` stand for, [..., T, C] in ``dtype`` — or written into ``out`` (a tensor or view of that
    shape, e.g. the front of a cache read's result) and returned."""
    which = kv_backend(codes, bits)
    if which == "cpu" and cpu_kv.supports(bits, codes.shape[-1]):
        return cpu_kv.dequantize(codes, scale, mn, bits, group, axis, out=out, dtype=dtype)
    run = _triton().kv.dequantize if which == "triton" else dequantize_reference
    x = run(codes, scale, mn, bits, group, axis, dtype if out is None else out.dtype)
    return x if out is None else out.copy_(x)
