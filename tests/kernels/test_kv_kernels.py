"""KV quantization kernels (hf_compress/kernels/reference/kv.py, dispatched in hf_compress/kernels/dispatch.py): the
torch reference's layout and error bound, dispatch, and the Triton kernels against the reference under
TRITON_INTERPRET=1 (CPU) in a fresh interpreter, on awkward shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import run_python

from hf_compress.kernels import dispatch
from hf_compress.kernels.dispatch import refresh_backend
from hf_compress.kernels.reference import kv as K


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_reference_roundtrip_error_bound(bits, axis):
    x = torch.randn(2, 3, 64, 40, generator=torch.Generator().manual_seed(0)) * 4 + 1
    group = 16 if axis == "channel" else K.token_group(40, 32, bits)
    codes, scale, mn = K.quantize_reference(x, bits, group, axis)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 64, 40 * bits // 8)
    assert scale.dtype == torch.float16
    assert scale.shape == ((2, 3, 4, 40) if axis == "channel" else (2, 3, 64, 40 // group))
    y = K.dequantize_reference(codes, scale, mn, bits, group, axis)
    step = scale.float().repeat_interleave(group, dim=-2 if axis == "channel" else -1)
    # half a step, plus the fp16 rounding of the stored minimum
    assert ((y - x).abs() <= step / 2 + 1e-3 * x.abs().amax()).all()


def test_pack_layout_little_endian():
    q = torch.tensor([[1, 2, 3, 0, 3, 3, 0, 1]], dtype=torch.uint8)
    packed = K.pack_codes(q, 2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4, 3 | 3 << 2 | 0 << 4 | 1 << 6]]
    assert torch.equal(K.unpack_codes(packed, 2), q)
    # 3-bit: one little-endian bit stream, 8 codes in 3 bytes (code c at bits 3c .. 3c + 2)
    q3 = torch.tensor([[5, 0, 7, 1, 0, 0, 6, 3]], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(q3[0]))
    assert K.pack_codes(q3, 3).tolist() == [[word & 255, word >> 8 & 255, word >> 16]]
    q3 = torch.randint(0, 8, (2, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(K.unpack_codes(K.pack_codes(q3, 3), 3), q3)


def test_constant_groups_and_bad_shapes():
    x = torch.full((1, 1, 8, 8), 3.25)
    y = K.dequantize_reference(*K.quantize_reference(x, 2, 8, "channel"), 2, 8, "channel")
    assert torch.equal(y, x)  # zero range: scale 0, exact minimum
    with pytest.raises(ValueError, match="multiple"):
        K.quantize_reference(torch.zeros(1, 1, 7, 8), 4, 8, "channel")
    with pytest.raises(ValueError, match="bits"):
        K.quantize_reference(torch.zeros(1, 1, 8, 8), 5, 8, "channel")
    with pytest.raises(ValueError, match="multiple of 8"):  # 3-bit packs 8 codes per 3 bytes
        K.quantize_reference(torch.zeros(1, 1, 8, 12), 3, 8, "channel")
    with pytest.raises(ValueError):
        K.token_group(6, 32, 2)


def test_dispatch_env(monkeypatch):
    """The KV kernels follow HF_COMPRESS_KERNELS as the weight kernels do (read once; `refresh_backend` re-reads)."""
    x = torch.zeros(1)
    try:
        monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
        assert refresh_backend() == "torch" and dispatch.kv_backend(x) == "torch"
        monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
        assert dispatch.kv_backend(x) == "torch"  # still the mode read last
        refresh_backend()
        assert dispatch.kv_backend(x) == "cpu"  # CPU tensor: the CPU dequantize fast path (hf_compress/kernels/cpu/kv.py)
        monkeypatch.setenv("HF_COMPRESS_KERNELS", "bogus")
        with pytest.raises(ValueError, match="HF_COMPRESS_KERNELS"):
            refresh_backend()
    finally:
        monkeypatch.undo()
        refresh_backend()


def test_dispatch_refuses_what_it_cannot_run(monkeypatch):
    """A forced mode that cannot run for the tensor raises, naming the problem, as the weight kernels'
    `backend_for` does — it used to run the reference quietly (cpu with a CUDA tensor) or fail inside Triton."""
    meta = torch.zeros(1, device="meta")  # a non-CPU tensor without a GPU
    try:
        monkeypatch.setenv("HF_COMPRESS_KERNELS", "cpu")
        refresh_backend()
        assert dispatch.kv_backend(torch.zeros(1)) == "cpu"
        with pytest.raises(RuntimeError, match="HF_COMPRESS_KERNELS=cpu with a meta tensor"):
            dispatch.kv_backend(meta)
        with pytest.raises(RuntimeError, match="HF_COMPRESS_KERNELS=cpu with a meta tensor"):
            dispatch.backend_for(meta)  # the same rule for the weight kernels
        monkeypatch.setenv("HF_COMPRESS_KERNELS", "triton")
        refresh_backend()
        if dispatch.triton_available() and not dispatch._triton().common.INTERPRET:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                dispatch.kv_backend(torch.zeros(1))
        elif not dispatch.triton_available():
            with pytest.raises(RuntimeError, match="not importable"):
                dispatch.kv_backend(torch.zeros(1))
        monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
        refresh_backend()
        assert dispatch.kv_backend(meta) == "torch" and dispatch.kv_backend(torch.zeros(1)) == "cpu"
    finally:
        monkeypatch.undo()
        refresh_backend()


def test_refresh_backend_clears_the_kv_triton_import():
    """One Triton import for weights and KV cache, so `refresh_backend` clears both (the KV kernels kept their own
    cached import, which it did not clear: a failed import stayed failed for the KV cache)."""
    assert dispatch.kv_backend.__module__ == dispatch._triton.__module__  # the KV dispatch is the weights' dispatch
    dispatch._triton()
    assert dispatch._triton.cache_info().currsize == 1
    refresh_backend()
    assert dispatch._triton.cache_info().currsize == 0


def test_triton_matches_reference_interpreted():
    pytest.importorskip("triton")
    proc = run_python("""
        import os, torch
        from hf_compress.kernels import dispatch
        from hf_compress.kernels.reference import kv as K
        assert dispatch.kv_backend(torch.zeros(1)) == "triton"
        g = torch.Generator().manual_seed(0)
        cases = [("token", (2, 3, 5, 64), 32), ("token", (1, 1, 33, 80), 16), ("token", (3, 2, 1, 8), 8),
                 ("channel", (2, 3, 64, 64), 32), ("channel", (3, 1, 16, 72), 16), ("channel", (1, 1, 48, 200), 16),
                 ("channel", (2, 2, 24, 64), 24)]
        n = 0
        for bits in (2, 4, 8):
            for axis, shape, group in cases:
                if axis == "token":
                    group = K.token_group(shape[-1], group, bits)
                x = torch.randn(shape, generator=g) * 3 + 0.5
                x[..., 0, 0] = 40.0  # an outlier
                got = dispatch.kv_quantize(x, bits, group, axis)
                ref = K.quantize_reference(x, bits, group, axis)
                for a, b in zip(got, ref):
                    assert a.dtype == b.dtype and a.shape == b.shape, (axis, shape, bits)
                    assert torch.equal(a, b), (axis, shape, bits)
                y = dispatch.kv_dequantize(*got, bits, group, axis, torch.float16)
                y_ref = K.dequantize_reference(*ref, bits, group, axis, torch.float16)
                assert y.dtype == torch.float16 and torch.equal(y, y_ref), (axis, shape, bits)
                n += 1
        x = torch.randn(2, 2, 16, 64, dtype=torch.bfloat16, generator=g)
        got = dispatch.kv_quantize(x, 4, 16, "channel", torch.bfloat16)
        assert all(torch.equal(a, b) for a, b in zip(got, K.quantize_reference(x, 4, 16, "channel", torch.bfloat16)))
        print("ok", n)
    """, env={"TRITON_INTERPRET": "1", "HF_COMPRESS_KERNELS": "triton"})
    assert proc.stdout.split() == ["ok", "21"]
