"""CPU fast paths: `QuantLinear` on PyTorch's int4 CPU kernel (every width, 2/3/4/8 bits), and `LowRankLinear`'s U
held by columns (`lowrank_columns`, at the end of this module).

PyTorch ships a weight-only int4 GEMM for CPU, ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group,
scales_and_zeros)`` (private ops, the ones torchao's int4 CPU layout calls): codes ``c`` in 0..15 with
``w = (c - 8) * scale + zero``, ``scales_and_zeros`` [K / group, N, 2] in the activation dtype, groups of
32/64/128/256 input columns, N a multiple of 16, K a multiple of the group. It is fast with bf16 activations (an
fp32 input runs ~50x slower), so the input is cast to bf16 and the output back. ``packed`` comes from
``_convert_weight_to_int4pack_for_cpu`` and its layout depends on the CPU's instruction set: it is built at run time
from the checkpoint's codes (`repack`), never stored.

Our layout (`kernels.reference.weights`) is ``W[o, k] = (q - z) * s`` per group of ``group_size`` columns. Re-expressed
exactly on the int4 kernel, with ``z' = zero``:

* 2/3/4 bits: ``c = q + 8 - h`` with ``h = 2**(bits - 1)`` (the code range centred on 8), ``scale = s``,
  ``zero = (h - z) * s``: ``(c - 8) * s + (h - z) * s = (q - z) * s``. Centring keeps ``zero`` as small as the
  weights themselves, so its bf16 rounding stays at the weights' own scale (with ``c = q`` a 2-bit zero would be
  ``(8 - z) * s``, ~5x the weights, and so its rounding);
* 8 bits: ``q = 16 * hi + lo`` with ``hi, lo`` in 0..15; the weight becomes two int4 halves side by side along K,
  ``[W_hi | W_lo]``, applied to ``[x | x]``: ``W_hi = (hi - 8) * 16s + (128 - z) * s`` and
  ``W_lo = (lo - 8) * s + 8s``, whose sum is ``(16 hi + lo - z) * s``. One call, 8 bits per weight in memory.

So the CPU kernel is exact up to bf16: the activations, and ``scale``/``zero`` stored in bf16 (relative rounding
2**-9 of each; the tests hold the output to relative 3e-2 of the fp32 reference, as the GPU kernels).

Shapes the kernel does not take are padded, not refused: K up to whole groups where no kernel group both divides the
layer's group and tiles K (a partial last group: zero columns of x meet whatever codes, so padding adds nothing;
where one does, e.g. 576 inputs with group 128 run as kernel groups of 64, K is not padded and a call pads nothing),
N up to a multiple of 16 (rows cut from the output). A group size that no kernel group divides (not a multiple of
32) is the one case left to the reference (`supports`). A kernel group smaller than ``group_size`` is fine: each
stored group becomes ``group_size // kernel_group`` kernel groups with the same scale and zero.

Plain functions over the packed buffers, usable without a transformers model (e.g. a vLLM linear method):
``pack = repack(qweight, scales, zeros, bits, group_size, in_features)`` once, then
``quant_linear(x, pack, bias, u, v)`` per call. A call of many rows (a prefill: ``DEQUANTIZE_ROWS``) dequantizes
the weight once (`dequantize_planes`, into a reused bf16 buffer the size of that one layer) and runs a bf16 GEMM, which outgrows the
int4 kernel's per-row cost. Memory at run time: the int4 copy (4 bits per weight; 8 for 8-bit
layers) and bf16 scales/zeros, beside the checkpoint's own buffers; where those codes are pages of a memory-mapped
checkpoint (how transformers loads safetensors files), they are handed back to the file after the repack and after
each prefill's read (`paging.release_pages`), so at run time the int4 copy takes their place instead of adding to them.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..reference.weights import SUPPORTED_BITS, codes_per_unit, unpack
from ..reference.weights import pack as pack_codes
from .paging import _release, _release_range, _unwritten

#: the private aten ops this path relies on (a test fails naming them if they disappear or change layout)
OPS = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernel takes, largest first
N_MULTIPLE = 16  # the kernel wants N % 16 == 0


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this torch has the int4 CPU ops (looked up once: dispatch asks at every forward)."""
    return all(hasattr(torch.ops.aten, name) for name in OPS)


@functools.lru_cache(maxsize=1)
def _int4_mm():
    """The int4 GEMM's overload, looked up once (``torch.ops.aten.<name>`` costs ~1 us per call to resolve)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu.default


@functools.lru_cache(maxsize=None)
def kernel_group(group_size: int) -> int | None:
    """The largest kernel group dividing ``group_size`` (None: no CPU kernel for it)."""
    return next((g for g in KERNEL_GROUPS if group_size % g == 0), None)


def tiling(group_size: int, in_features: int) -> tuple[int, int]:
    """(kernel group, padded K) of a layer: kernel groups that divide ``group_size`` and tile K exactly where one
    exists (no padded columns, no padded activations per call: 576 inputs with group 128 run as groups of 64), else
    the largest dividing ``group_size`` with K padded to whole groups of the layer."""
    whole = next((g for g in KERNEL_GROUPS if group_size % g == 0 and in_features % g == 0), None)
    if whole is not None:
        return whole, in_features
    return kernel_group(group_size), -(-in_features // group_size) * group_size


@functools.lru_cache(maxsize=None)  # asked at every forward
def supports(bits: int, group_size: int) -> bool:
    return bits in SUPPORTED_BITS and kernel_group(group_size) is not None


class Int4Pack(NamedTuple):
    """A layer repacked for ``_weight_int4pack_mm_for_cpu``."""

    weight: torch.Tensor  # uint8, from _convert_weight_to_int4pack_for_cpu (CPU-ISA specific)
    scales_zeros: torch.Tensor  # [copies * padded / group, padded N, 2] bf16
    group: int  # kernel group
    in_features: int  # K of the layer
    padded: int  # K, or K rounded up to whole groups of the layer where no kernel group tiles K
    copies: int  # 1, or 2 for 8-bit layers ([hi | lo] halves)
    out_features: int  # N of the layer
    sources: tuple = ()  # per output block, (qweight, scales, zeros, bits, group_size): references for `dequantize_planes`
    mapped: tuple = ()  # per source, its codes' page range in a file mapping (`paging.release_pages`), or None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_zeros))


def int4_layout(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                in_features: int, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Our packed layout re-expressed for the int4 kernel, exactly (fp32, before any rounding to bf16): int4 codes
    [rows, copies * padded] (int32; ``rows`` >= N, default N: the extra rows and the padded columns are code 0),
    scales and zeros [N, copies * padded / kernel group] (fp32) with ``W = sum over copies of (c - 8) * scale + zero``
    (module docstring), and the kernel group. Built in place in one int32 buffer (repacking a layer needs ~12 bytes
    per weight for a moment, not a dense copy)."""
    if not supports(bits, group_size):
        raise ValueError(f"the int4 CPU kernel takes groups that are multiples of 32 and 2/3/4/8-bit codes; "
                         f"got group_size={group_size}, bits={bits}")
    codes = unpack(qweight, bits, in_features, dtype=torch.int32)
    n = codes.shape[0]
    gk, padded = tiling(group_size, in_features)
    s, z = scales.float(), zeros.float()
    if bits == 8:
        halves = [(torch.Tensor.bitwise_right_shift_, 4, 16 * s, (128 - z) * s),
                  (torch.Tensor.bitwise_and_, 15, s, 8 * s)]
    else:
        h = 2 ** (bits - 1)
        halves = [(torch.Tensor.add_, 8 - h, s, (h - z) * s)]
    cols = torch.zeros(rows or n, len(halves) * padded, dtype=torch.int32)
    for i, (op, arg, _, _) in enumerate(halves):  # in place: no temporary the size of the codes
        part = cols[:n, i * padded:i * padded + in_features]
        op(part.copy_(codes), arg)
    rep, per_half = group_size // gk, padded // gk
    sc = torch.cat([sc.repeat_interleave(rep, 1)[:, :per_half] for *_, sc, _ in halves], 1)
    zp = torch.cat([zp.repeat_interleave(rep, 1)[:, :per_half] for *_, zp in halves], 1)
    return cols, sc, zp, gk


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
           in_features: int) -> Int4Pack:
    """Our packed layout -> the int4 CPU kernel's (`int4_layout` with N padded to a multiple of 16, converted)."""
    return repack_concat([(qweight, scales, zeros, bits, group_size, in_features)])


#: rows from which a call dequantizes the weight once and runs a bf16 GEMM instead of the int4 kernel, per pack
#: ``copies`` (1: 2/3/4 bits, 2: 8 bits, whose int4 call reads K twice). The int4 kernel costs one GEMV per row
#: (1536 x 576, 1 thread: 10 us a row), the other path a fixed ~0.45 ms for the dequantization plus the bf16 GEMM's
#: 3.6 us a row. `benchmarks/prefill.py` measures the whole model both ways: the two cross at 110-140 rows for
#: 2/3/4 bits and below 32 rows for 8 bits
DEQUANTIZE_ROWS = {1: 128, 2: 32}
#: the row counts `_probe_rows` tries (CPUs without native bf16), in order; the first where the prefill path is at
#: least as fast is kept
PROBE_ROWS = (4, 8, 16, 32, 64, 128, 256)
#: fewer rows than every threshold (`DEQUANTIZE_ROWS`, `PROBE_ROWS`): the int4 kernel without looking one up
MIN_PREFILL_ROWS = min(*DEQUANTIZE_ROWS.values(), *PROBE_ROWS)

_scratch = threading.local()


def _buffer(slot: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer of at least ``numel`` elements, reused from call to call: a fresh multi-megabyte
    tensor per layer and call comes straight from the OS and is page-faulted in every time (a 7B layer's fp32
    buffer: ~10x the time of the conversion written into it). Kept at the largest layer's size: ~7 bytes per
    weight of that one layer, per thread that runs a prefill."""
    buf = getattr(_scratch, slot, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, slot, buf)
    return buf[:numel]


def plane_order(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [M, K] with its columns in `dequantize_planes`' order: column ``i * U + u`` is input ``u * c + i`` (``c``
    codes per unit, ``U = K / c`` units)."""
    c = codes_per_unit(bits)
    if c == 1:
        return x
    m, k = x.shape
    return x.view(m, k // c, c).transpose(1, 2).reshape(m, k)


def dequantize_planes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The layer's dense weight in ``dtype`` (bf16, or fp32 on CPUs without native bf16: `gemm_dtype`),
    [N, groups * group_size], with its columns in plane order (`plane_order`:
    apply it to the input): code ``i`` of every byte-aligned unit of a row is read with one shift and mask over the
    row's bytes, so every step is a contiguous elementwise pass, and no permutation of the weight is ever made.
    Columns past ``in_features`` belong to the padded last group (give them zero inputs). Computed in fp32, in
    reused buffers (`_buffer`), rounded once to bf16; the result is a scratch buffer, valid until the next call on
    this thread."""
    n, groups = scales.shape
    k = groups * group_size
    c = codes_per_unit(bits)
    units = k // c
    nbytes = units * (3 if bits == 3 else 1)
    b = qweight.view(torch.uint8)
    if b.shape[1] < nbytes:  # the padded last group reads code 0
        b = F.pad(b, (0, nbytes - b.shape[1]))
    b = b[:, :nbytes]
    codes = _buffer("codes", n * k, torch.uint8).view(n, c, units)
    if bits == 8:
        codes[:, 0].copy_(b)
    elif bits == 3:  # code i of a unit starts at bit 3i of its 24: codes 2 and 5 straddle two bytes
        planes = _buffer("bytes", n * nbytes, torch.uint8).view(n, 3, units)
        b0, b1, b2 = planes.copy_(b.view(n, units, 3).transpose(1, 2)).unbind(1)  # byte j of every unit, contiguous
        for i, (byte, shift) in enumerate([(b0, 0), (b0, 3), (b0, 6), (b1, 1), (b1, 4), (b1, 7), (b2, 2), (b2, 5)]):
            torch.bitwise_right_shift(byte, shift, out=codes[:, i])
        codes[:, 2].bitwise_or_(b1 << 2)  # the bits above a code's 3 are cleared by the mask below
        codes[:, 5].bitwise_or_(b2 << 1)
        codes.bitwise_and_(7)
    else:
        for i in range(c):
            torch.bitwise_right_shift(b, i * bits, out=codes[:, i])
        codes.bitwise_and_(2**bits - 1)
    run = group_size // c  # units per group (a unit never straddles a group: groups are multiples of 32 codes)
    shape = (n, 1, groups, run)
    s = scales.float().view(n, 1, groups, 1)
    zs = zeros.float().view(n, 1, groups, 1) * s
    if run < 32:  # scales per unit, so that the passes below run along whole rows: broadcast per group, inner
        # runs of 8 units (3 bits g64, 2 bits g32) make the elementwise loops ~3x slower (measured)
        per_unit = _buffer("scales", 2 * n * units, torch.float32).view(2, *shape)
        s, zs = per_unit[0].copy_(s.expand(shape)), per_unit[1].copy_(zs.expand(shape))
    w = _buffer("fp32", n * k, torch.float32).view(n, c, groups, run).copy_(codes.view(n, c, groups, run))
    w.mul_(s).sub_(zs)
    if dtype == torch.float32:
        return w.view(n, k)
    return _buffer("bf16", n * k, dtype).view(n, k).copy_(w.view(n, k))


def concat_key(bits: int, group_size: int, in_features: int) -> tuple[int, int, int, int] | None:
    """Layers on one input with equal keys can share one `repack_concat` (same kernel group, padded K and copies, as
    `tiling` gives them); None: no CPU kernel for the layer."""
    if not supports(bits, group_size):
        return None
    gk, padded = tiling(group_size, in_features)
    return gk, in_features, padded, 2 if bits == 8 else 1


def repack_concat(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]]) -> Int4Pack:
    """Several layers on the same input, ``(qweight, scales, zeros, bits, group_size, in_features)`` each, as one
    `Int4Pack` whose output is their outputs side by side (a merged ``qkv`` / ``gate_up`` projection in one kernel
    call). Their `concat_key` must agree (bits and group sizes may differ otherwise: every width becomes int4 codes
    with its own scales and zeros); each output column is computed exactly as in the layer's own `repack` (the
    one-layer case)."""
    keys = {concat_key(*layer[3:]) for layer in layers}
    if len(layers) > 1 and (len(keys) != 1 or None in keys):  # one layer: int4_layout names what it cannot take
        raise ValueError(f"layers with different kernel layouts cannot share one int4 pack: {sorted(map(str, keys))}")
    if not available():
        raise RuntimeError(f"this torch ({torch.__version__}) has no aten.{OPS[0]} / aten.{OPS[1]}")
    n = sum(layer[0].shape[0] for layer in layers)
    n_pad = n + -n % N_MULTIPLE
    step = REPACK_ROWS if _row_blocks_independent() else n_pad
    packed, scs, zps = [], [], []
    for a in range(0, n_pad, step):  # a chunk of rows at a time: ~8.5 bytes per weight of one chunk, not the layer
        b = min(a + step, n_pad)
        cols, sc, zp = _layout_rows(layers, a, min(b, n), rows=b - a)
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(cols, 1))
        scs.append(sc)
        zps.append(zp)
        del cols
    weight = packed[0] if len(packed) == 1 else torch.cat(packed)
    del packed
    sc, zp = (t[0] if len(t) == 1 else torch.cat(t) for t in (scs, zps))
    sz = F.pad(torch.stack([sc, zp], -1), (0, 0, 0, 0, 0, -n % N_MULTIPLE))  # [N', K' / gk, 2]
    gk, in_features, padded, copies = keys.pop()
    pack = Int4Pack(weight, sz.transpose(0, 1).to(torch.bfloat16).contiguous(), gk, in_features, padded, copies, n,
                    tuple(layer[:5] for layer in layers), tuple(_release_range(layer[0]) for layer in layers))
    for span in pack.mapped:  # `_release_range` has just checked these pages unwritten
        if span is not None:
            _release(span)
    return pack


def _release_codes(pack: Int4Pack, i: int) -> None:
    """Hand source ``i``'s codes back to its checkpoint file (`paging.release_pages`) after a read: what a call runs is
    the int4 copy, and a prefill reads the codes again (`dequantize_planes`) one layer at a time, so they need not stay
    resident. A no-op for codes in anonymous memory (the span is looked up once, at the repack); the pages are
    checked unwritten each time."""
    span = pack.mapped[i]
    if span is not None and _unwritten(*span):
        _release(span)


#: rows repacked at a time (`repack_concat`): a multiple of the probe's 64-row chunks (`_row_blocks_independent`);
#: the temporaries of one chunk (int32 codes and columns) are 8 bytes per weight of the chunk, ~19 MB at K = 576
REPACK_ROWS = 4096


def _layout_rows(layers, a: int, b: int, rows: int):
    """`int4_layout` of rows ``a:b`` of the layers' outputs side by side, in a buffer of ``rows`` rows (the extra
    ones code 0) — (codes [rows, K'], scales [b - a, K' / gk], zeros)."""
    parts, off = [], 0
    for qweight, scales, zeros, bits, group_size, in_features in layers:
        lo, hi = max(a, off) - off, min(b, off + qweight.shape[0]) - off
        if lo < hi:
            parts.append((qweight[lo:hi], scales[lo:hi], zeros[lo:hi], bits, group_size, in_features))
        off += qweight.shape[0]
    if len(parts) == 1:  # built straight into the padded buffer: no concatenated copy of the codes
        cols, sc, zp, _ = int4_layout(*parts[0], rows=rows)
        return cols, sc, zp
    built = [int4_layout(*part) for part in parts]
    cols = F.pad(torch.cat([c for c, *_ in built]), (0, 0, 0, rows - (b - a)))
    return cols, torch.cat([x[1] for x in built]), torch.cat([x[2] for x in built])


@functools.lru_cache(maxsize=1)
def _row_blocks_independent() -> bool:
    """Whether this CPU's int4 layout packs blocks of rows independently (so that packing a layer a chunk of
    `REPACK_ROWS` rows at a time and concatenating gives the layer's pack): checked once against one conversion of
    a probe of 144 rows (two chunks of 64 and 80). Where it is not, a layer is packed in one piece."""
    if not available():
        return False
    codes = torch.randint(0, 16, (144, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    whole = convert(codes, 1)
    parts = torch.cat([convert(codes[:64].contiguous(), 1), convert(codes[64:].contiguous(), 1)])
    return whole.shape == parts.shape and torch.equal(whole, parts)


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether bf16 GEMMs run natively here (AVX512-BF16 or AMX) for torch as it runs now: a capability forced
    below AVX512 (``ATEN_CPU_CAPABILITY=avx2``) counts as without. Without native bf16 a bf16 GEMM is several times
    slower than fp32 (2048 x 2048 at 256 rows, 1 thread, an AVX2 EPYC: bf16 200 ms, fp32 25 ms)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def gemm_dtype() -> torch.dtype:
    """The dtype of the prefill path's dequantized weight and GEMM: bf16 where native, fp32 elsewhere."""
    return torch.bfloat16 if native_bf16() else torch.float32


def _int4_linear(x2: torch.Tensor, pack: Int4Pack) -> torch.Tensor:
    """x2 [M, K] · Wᵀ on torch's int4 kernel (bf16 activations; the output in bf16, [M, N])."""
    xb = x2.bfloat16()  # (a no-op for bf16; the named conversions parse their arguments ~1 us faster than .to)
    if pack.padded != pack.in_features:
        xb = F.pad(xb, (0, pack.padded - pack.in_features))
    if pack.copies == 2:
        xb = torch.cat([xb, xb], 1)
    y = _int4_mm()(xb.contiguous(), pack.weight, pack.group, pack.scales_zeros)
    return y if y.shape[1] == pack.out_features else y[:, :pack.out_features]


def _dequantized_linear(x2: torch.Tensor, pack: Int4Pack) -> torch.Tensor:
    """x2 [M, K] · Wᵀ with each source's weight dequantized once (`dequantize_planes`) in `gemm_dtype`."""
    dtype = gemm_dtype()
    xd = x2.to(dtype)
    parts = []
    for i, (qweight, scales, zeros, bits, group_size) in enumerate(pack.sources):
        xs = F.pad(xd, (0, scales.shape[1] * group_size - pack.in_features))
        w = dequantize_planes(qweight, scales, zeros, bits, group_size, dtype)
        _release_codes(pack, i)
        parts.append(F.linear(plane_order(xs, bits), w))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def prefill_rows(pack: Int4Pack) -> int:
    """Rows from which a call takes the prefill path (`_dequantized_linear`) instead of the int4 kernel. With native
    bf16: `DEQUANTIZE_ROWS` (measured by `benchmarks/prefill.py`). Without: probed once per process and shape class
    (`_probe_rows`), since there the int4 kernel's per-row cost and the fp32 GEMM's differ from CPU to CPU."""
    if native_bf16():
        return DEQUANTIZE_ROWS[pack.copies]
    return _probe_rows(pack.in_features, tuple((s[3], s[4], s[0].shape[0]) for s in pack.sources),
                       torch.get_num_threads())




@functools.lru_cache(maxsize=None)
def _probe_rows(k: int, sources: tuple, threads: int) -> int:
    """Time both paths on a random layer of this shape class (K and, per source, its width, group and rows: what the
    pack's layout follows from) at `PROBE_ROWS` rows
    (best of 3 each) and return the first row count where the prefill path wins; past the last, never. Runs once per
    shape class and thread count per process (a few ms to a few hundred ms per class)."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for bits, group_size, rows in sources:
        groups = -(-k // group_size)
        codes = torch.randint(0, 2**bits, (rows, k), dtype=torch.int32, generator=gen)
        layers.append((pack_codes(codes, bits), torch.rand(rows, groups, generator=gen) / 16 + 1e-3,
                       torch.full((rows, groups), 2.0 ** (bits - 1)), bits, group_size, k))
    probe = repack_concat(layers)

    def best(fn, x):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        return min(times)

    for m in PROBE_ROWS:
        x = torch.randn(m, k, generator=gen)
        if best(lambda x: _dequantized_linear(x, probe), x) <= best(lambda x: _int4_linear(x, probe), x):
            return m
    return 1 << 62


def describe() -> str:
    """One line on what the CPU paths run on this machine (``hf-compress info``, the demo)."""
    if not available():
        return f"CPU kernels: none in this torch ({torch.__version__}); the reference runs"
    cap = torch.backends.cpu.get_cpu_capability()
    if native_bf16():
        prefill = (f"dequantized once into a bf16 GEMM from {DEQUANTIZE_ROWS[1]} rows "
                   f"({DEQUANTIZE_ROWS[2]} at 8 bits)")
    else:
        prefill = "dequantized once into an fp32 GEMM from a row count probed per layer shape (no native bf16)"
    return (f"CPU kernels on {cap} (native bf16: {'yes' if native_bf16() else 'no'}): quantized layers run torch's "
            f"int4 kernel at decode, {prefill}; low-rank layers two GEMMs in the model's dtype")


def quant_linear(x: torch.Tensor, pack: Int4Pack, bias: torch.Tensor | None = None, u: torch.Tensor | None = None,
                 v: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ + (x · Vᵀ) · Uᵀ + b for a layer `repack`-ed into ``pack``; returned in ``x.dtype``."""
    if x.shape[-1] != pack.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer {pack.in_features}")
    x2 = x.reshape(-1, pack.in_features)
    # a long prefill dequantizes once; decode-sized calls (fewer rows than any threshold) skip the threshold lookup
    if pack.sources and x2.shape[0] >= MIN_PREFILL_ROWS and x2.shape[0] >= prefill_rows(pack):
        y = _dequantized_linear(x2, pack)
    else:
        y = _int4_linear(x2, pack)
    return _finish(y, x, x2, pack.out_features, bias, u, v)


def _finish(y: torch.Tensor, x: torch.Tensor, x2: torch.Tensor, out_features: int, bias, u, v) -> torch.Tensor:
    """The kernel's bf16 output [M, N] -> ``x.dtype``, plus the low-rank path and the bias, shaped as ``x``."""
    y = y.float() if x.dtype is torch.float32 else y.to(x.dtype)
    if u is not None:  # in the input's dtype: at one row an fp32 GEMV is faster on CPU than a bf16 one
        y = torch.addmm(y, F.linear(x2, v.to(x.dtype)), u.to(x.dtype).t())
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], out_features)


def decoder(pack: Int4Pack):
    """``run(x, bias, u, v)``: `quant_linear` on ``pack`` for decode-sized inputs (fewer than `MIN_PREFILL_ROWS`
    rows, ``x`` [..., K] on the CPU; the caller checks both), with what `quant_linear` looks up per call resolved
    once: the op, the pack's fields and, where K needs no padding and N no cut (no 8-bit halves), the input's
    preparation reduced to its bf16 cast. Same arithmetic as `quant_linear`, so the same result bit for bit.
    Also ``run.rows``: the decode-sized calls take fewer rows than this."""
    op, weight, group, scales_zeros = _int4_mm(), pack.weight, pack.group, pack.scales_zeros
    k, n = pack.in_features, pack.out_features
    plain = pack.padded == k and pack.copies == 1 and n % N_MULTIPLE == 0

    if plain:
        def run(x, bias=None, u=None, v=None):
            flat = x.dim() == 2  # rows already (the experts' input): no reshape, no view back
            x2 = x if flat else x.reshape(-1, k)
            y = op(x2.bfloat16().contiguous(), weight, group, scales_zeros)
            if u is None and bias is None:
                y = y.float() if x.dtype is torch.float32 else y.to(x.dtype)
                return y if flat else y.view(*x.shape[:-1], n)
            return _finish(y, x, x2, n, bias, u, v)
    else:
        def run(x, bias=None, u=None, v=None):
            x2 = x.reshape(-1, k)
            return _finish(_int4_linear(x2, pack), x, x2, n, bias, u, v)
    run.rows = MIN_PREFILL_ROWS
    return run


# ----------------------------------------------------------------------------------------------- low rank
def lowrank_columns(u: torch.Tensor) -> torch.Tensor:
    """The U [out, r] a low-rank layer's CPU forward reads: U stored by columns (a contiguous [r, out] buffer,
    viewed transposed) where U's own pages can be handed back, U itself otherwise. One row of fp32 activations
    times a row-major U is a GEMV over ``out`` short rows of ``r`` values, which MKL runs at about half the
    bandwidth of the same product over U's columns (SmolLM2's 1536 x 251 U at 2 threads, weights streamed from
    memory: 204 vs 109 us; 576 x 251: 69 vs 32 us; bf16 runs through oneDNN and reads either layout at one speed,
    so only fp32 takes this). Same product up to the order of fp32 additions.

    U itself is left as it is (the checkpoint's layout, what state dicts, merges and the other backends read). The
    copy is made only when U's pages come from a memory-mapped checkpoint (how transformers loads safetensors
    files) and so can be taken out of the process's RSS after the copy (`paging.release_pages`): the copy then replaces
    them rather than adding U's bytes. A U in anonymous memory (a model compressed in this process, or converted
    to another dtype at load) is read as it is: a second copy would add its bytes for good."""
    span = _release_range(u)
    if span is None:
        return u
    cols = u.detach().t().contiguous().t()
    _release(span)
    return cols
