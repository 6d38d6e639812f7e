"""OS memory around the CPU kernels (no kernels here): handing freed heap memory back (glibc ``malloc_trim``) and
taking unwritten pages of a memory-mapped checkpoint out of the resident set (``/proc/self/maps``,
``/proc/self/pagemap``, ``madvise``).

The CPU weight paths (`kernels.cpu.weights`) call these after a repack and after each prefill's read of the codes,
and when U is copied by columns, so that at run time their copies take the place of the checkpoint's pages instead
of adding to them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch


@functools.lru_cache(maxsize=None)
def _libc(name: str):
    """The C library's function ``name`` (ctypes), or None where there is none (not glibc / not Linux)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the repack's freed temporaries back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Without it
    glibc keeps them in the heap (its mmap threshold grows with each large free), and a model repacked layer by
    layer keeps ~1.3x its dense fp32 projection bytes resident (measured on a 52M-weight Llama: +277 MB, vs +60 MB)."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


_MADV_DONTNEED = 4  # Linux


@functools.lru_cache(maxsize=1)
def _madvise():
    fn = _libc("madvise") if sys.platform.startswith("linux") else None
    if fn is not None:
        fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


def mapped_file(start: int, end: int, deleted: bool = False) -> str | None:
    """The file whose mapping in this process holds the bytes [start, end) whole; None for anonymous memory, the
    heap, bytes across mappings, systems without ``/proc/self/maps``, and a deleted file unless ``deleted`` (then
    its path as the kernel shows it, ending in `` (deleted)``)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= start < hi:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    gone = path.endswith(" (deleted)")
                    return path if end <= hi and path.startswith("/") and (deleted or not gone) else None
    except OSError:
        pass
    return None


def _unwritten(first: int, last: int) -> bool:
    """Whether no page of [first, last) that this process has resident is a private (copy-on-write) copy: each is
    still the file's own page (``/proc/self/pagemap``: bit 63 present, bit 61 file page or shared)."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first // page * 8)
            data = pagemap.read((last - first) // page * 8)
    except OSError:
        return False
    if len(data) != (last - first) // page * 8:
        return False
    entries = torch.frombuffer(bytearray(data), dtype=torch.int64)
    return not bool(((entries < 0) & ((entries >> 61) & 1 == 0)).any())


def _release_range(t: torch.Tensor) -> tuple[int, int] | None:
    """The page-aligned address range `release_pages` would release for ``t``; None where it would do nothing."""
    if _madvise() is None or t.device.type != "cpu" or not t.is_contiguous():
        return None
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first or mapped_file(start, end) is None or not _unwritten(first, last):
        return None
    return first, last


def release_pages(t: torch.Tensor) -> int:
    """Take the whole pages of ``t``'s bytes out of this process's resident set, where they are pages of a file
    mapping (a safetensors checkpoint that transformers memory-mapped) that nothing wrote; returns the bytes
    released (0: nothing done). Linux ``madvise(MADV_DONTNEED)``: a later read of ``t`` faults the pages back in
    from the file, unchanged. Left alone: anonymous memory (whose pages it would zero), a range where any page was
    written (in a private mapping a written page is a copy-on-write copy, which would revert to the file's
    bytes: checked page by page in ``/proc/self/pagemap``, so a write through ``.data`` is seen too), and systems
    other than Linux."""
    span = _release_range(t)
    return 0 if span is None else _release(span)


def _release(span: tuple[int, int]) -> int:
    first, last = span
    return last - first if _madvise()(first, last - first, _MADV_DONTNEED) == 0 else 0
