"""Every Triton kernel against its torch reference, on CPU under Triton's interpreter.

Needs ``TRITON_INTERPRET=1`` before triton is imported, so this module only runs in a process started that way:
`test_kernels.py::test_triton_kernels_under_interpreter` runs it in a subprocess (what CI does); by hand:

    TRITON_INTERPRET=1 HF_COMPRESS_KERNELS=triton OMP_NUM_THREADS=1 \
        .venv/bin/python -m pytest tests/kernels/test_kernels_interpret.py

Shapes are small (the interpreter runs each program in numpy) but cross every block boundary: sizes that are
not multiples of the blocks, batch 1, odd ranks, ranks over several rank blocks, in_features not a multiple
of the group size (a partial last group), non-contiguous inputs and extra leading dims.

Tolerances (max |kernel - reference| / max |reference|): fp32 1e-5, fp16 4e-3, bf16 3e-2 — a few units of the
output dtype's rounding; the kernels accumulate in fp32 while the fp16/bf16 references round intermediates.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported; run by test_kernels.py in a subprocess",
                allow_module_level=True)

import torch  # noqa: E402

from hf_compress.kernels.reference import weights as reference  # noqa: E402
from hf_compress.kernels.triton import lowrank as tlr  # noqa: E402
from hf_compress.kernels.triton import weights as tq  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    scale = ref.float().abs().max().clamp_min(1e-6)
    err = float((y.float() - ref.float()).abs().max() / scale)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]} ({dtype})"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def lowrank_case(lead, k, n, r, dtype, bias=True, seed=0):
    g = gen(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    v = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    u = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, u, v, b


def lowrank_ref(x, u, v, b):
    return reference.lowrank_linear(x, u, v, b)  # the specification, in x's dtype


# ------------------------------------------------------------------------------------------------- low-rank
LOWRANK_SHAPES = [  # (leading dims, in, out, rank)
    ((1,), 70, 45, 21),       # batch 1, nothing a multiple of a block
    ((1, 1), 33, 100, 40),    # rank over several rank blocks, out over several chunks
    ((3,), 64, 32, 1),        # rank 1
    ((2, 8), 50, 19, 37),     # 16 rows exactly (last decode size), odd rank
    ((17,), 40, 30, 9),       # first prefill size
    ((2, 3, 7), 90, 33, 17),  # 42 rows over 3 leading dims
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,k,n,r", LOWRANK_SHAPES)
def test_lowrank_matches_reference(lead, k, n, r, dtype):
    x, u, v, b = lowrank_case(lead, k, n, r, dtype, bias=r != 1)
    close(tlr.lowrank_linear(x, u, v, b), lowrank_ref(x, u, v, b), dtype)


@pytest.mark.parametrize("path", ["decode", "decode-nofixup", "prefill"])
@pytest.mark.parametrize("rows", [1, 5])
def test_lowrank_paths_agree_for_decode_sizes(rows, path):
    for dtype in (torch.float32, torch.float16):
        x, u, v, b = lowrank_case((rows,), 45, 38, 19, dtype, seed=rows)
        close(tlr.lowrank_linear(x, u, v, b, path=path), lowrank_ref(x, u, v, b), dtype)


@pytest.mark.parametrize("config", [
    dict(BLOCK_R=8, BLOCK_K=64, BLOCK_N=16, SPLIT_N=3),      # several programs per output chunk set
    dict(BLOCK_R=32, BLOCK_K=128, BLOCK_N=64, SPLIT_N=1),    # one rank block, blocks larger than the problem
    dict(BLOCK_R=16, BLOCK_K=16, BLOCK_N=16, SPLIT_N=2),
])
@pytest.mark.parametrize("rows", [1, 7])
def test_lowrank_decode_configs(config, rows):
    x, u, v, b = lowrank_case((rows,), 53, 41, 27, torch.float16, seed=3)
    close(tlr.lowrank_linear(x, u, v, b, config=config, path="decode"), lowrank_ref(x, u, v, b), torch.float16)


def test_lowrank_noncontiguous_and_no_bias():
    x, u, v, _ = lowrank_case((30, 4), 24, 20, 6, torch.float32)
    xt = x.transpose(0, 1)  # [4, 30, 24] view, not contiguous
    ut = u.t().contiguous().t()  # U as a transposed view
    assert not xt.is_contiguous() and not ut.is_contiguous()
    close(tlr.lowrank_linear(xt, ut, v, None), reference.lowrank_linear(xt, u, v, None), torch.float32)
    close(tlr.lowrank_linear(xt[:1, :1], ut, v, None), reference.lowrank_linear(xt[:1, :1], u, v, None),
          torch.float32)


def test_mm_nt_configs():
    g = gen(5)
    for m in (1, 9, 70):
        a, b = torch.randn(m, 77, generator=g), torch.randn(29, 77, generator=g)
        bias = torch.randn(29, generator=g)
        close(tlr.mm_nt(a, b, bias), torch.nn.functional.linear(a, b, bias), torch.float32)
        close(tlr.mm_nt(a.half(), b.half(), None, torch.float32), a.half().float() @ b.half().float().T,
              torch.float32)


# ---------------------------------------------------------------------------------------------- quantized
def quant_case(out, inp, bits, group, scale_dtype=torch.float16, seed=0):
    """A random packed layout (``reference``'s docstring: no padding, the last group partial when the group
    size does not divide ``inp``)."""
    g = gen(seed)
    n_groups = -(-inp // group)
    codes = torch.randint(0, 2**bits, (out, inp), generator=g)
    qweight = reference.pack(codes, bits)
    scales = (torch.rand(out, n_groups, generator=g) * 0.05 + 0.01).to(scale_dtype)
    zeros = (torch.rand(out, n_groups, generator=g) * (2**bits - 1)).to(scale_dtype)
    return qweight, scales, zeros


def quant_ref(x, qweight, scales, zeros, bits, group, inp, b=None, u=None, v=None):
    return reference.quant_linear(x, qweight, scales, zeros, bits, group, inp, b, u, v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("lead", [(1,), (2, 2), (37,)], ids=["gemv", "small", "gemm"])
def test_quant_matches_reference(bits, group, lead):
    inp, out = 100, 37  # 100 is no multiple of any group size: a partial last group
    qweight, scales, zeros = quant_case(out, inp, bits, group, seed=bits * group)
    g = gen(1)
    x = torch.randn(*lead, inp, generator=g).half()
    b = torch.randn(out, generator=g).half()
    close(tq.quant_linear(x, qweight, scales, zeros, bits, group, inp, b),
          quant_ref(x, qweight, scales, zeros, bits, group, inp, b), torch.float16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows,rank,path", [(1, 5, "auto"), (6, 40, "auto"), (20, 1, "auto"), (1, 33, "two-launch"),
                                            (16, 17, "two-launch")])
def test_fused_quant_lowrank(bits, rows, rank, path):
    """auto: one fused launch up to 16 rows (rank 40: three rank slices; 29 outputs: two chunks), the two-launch
    form above; the two-launch form is also checked at decode sizes."""
    inp, out, group = 72, 29, 32
    qweight, scales, zeros = quant_case(out, inp, bits, group, seed=bits + rank)
    g = gen(2)
    x = torch.randn(rows, inp, generator=g)
    u, v = torch.randn(out, rank, generator=g) * 0.1, torch.randn(rank, inp, generator=g) * 0.1
    b = torch.randn(out, generator=g)
    close(tq.quant_linear(x, qweight, scales, zeros, bits, group, inp, b, u, v, path=path),
          quant_ref(x, qweight, scales, zeros, bits, group, inp, b, u, v), torch.float32)
    close(tq.quant_linear(x, qweight, scales, zeros, bits, group, inp, None, u, v, path=path),
          quant_ref(x, qweight, scales, zeros, bits, group, inp, None, u, v), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 16])
def test_fused_quant_lowrank_half_output_is_cast_by_the_last_contribution(dtype, rows):
    """fp16/bf16: the chunk counters decide who casts; every output element must come out (none left at the
    workspace's zero or the empty tensor's garbage)."""
    inp, out, bits, group, rank = 80, 70, 4, 32, 35  # 70 outputs: 5 chunks of 16; rank 35: 3 slices
    qweight, scales, zeros = quant_case(out, inp, bits, group)
    g = gen(7)
    x = torch.randn(rows, inp, generator=g).to(dtype)
    u, v = (torch.randn(out, rank, generator=g) * 0.1).to(dtype), (torch.randn(rank, inp, generator=g) * 0.1).to(dtype)
    b = torch.randn(out, generator=g).to(dtype)
    for split in (1, 2, 4):
        close(tq.quant_linear(x, qweight, scales, zeros, bits, group, inp, b, u, v, path="fused",
                              config=dict(BLOCK_N=16, BLOCK_K=32, BLOCK_R=16, SPLIT_N=split)),
              quant_ref(x, qweight, scales, zeros, bits, group, inp, b, u, v), dtype)
    with pytest.raises(ValueError, match="at most 16 rows"):
        tq.quant_linear(torch.randn(17, inp).to(dtype), qweight, scales, zeros, bits, group, inp, b, u, v,
                        path="fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 19])
def test_quant_dtypes(dtype, scale_dtype, rows):
    inp, out, bits, group = 96, 21, 4, 64
    qweight, scales, zeros = quant_case(out, inp, bits, group, scale_dtype=scale_dtype)
    g = gen(3)
    x = torch.randn(rows, inp, generator=g).to(dtype)
    u, v = (torch.randn(out, 3, generator=g) * 0.1).to(dtype), (torch.randn(3, inp, generator=g) * 0.1).to(dtype)
    close(tq.quant_linear(x, qweight, scales, zeros, bits, group, inp, None, u, v),
          quant_ref(x, qweight, scales, zeros, bits, group, inp, None, u, v), dtype)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [24, 16, 128])
@pytest.mark.parametrize("config", [
    dict(BLOCK_N=32, BLOCK_K=256),                 # GPU GEMV-sized tile: K fits in one masked tile
    dict(BLOCK_N=16, BLOCK_K=32),                  # group 128: four tiles per group
    dict(BLOCK_N=16, BLOCK_K=16),                  # tile under 32 codes: the 3-bit per-code gather
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, BLOCK_R=16, GROUP_M=1),
])
def test_quant_scale_paths_and_configs(bits, group, config):
    """Group sizes that divide the tile, contain it, or neither (24: per-column gather)."""
    inp, out = 130, 18
    qweight, scales, zeros = quant_case(out, inp, bits, group, seed=group)
    g = gen(4)
    rows = 1 if config.get("BLOCK_M", 1) == 1 else 3
    x = torch.randn(rows, inp, generator=g)
    u, v = torch.randn(out, 20, generator=g) * 0.1, torch.randn(20, inp, generator=g) * 0.1
    cfg = {"BLOCK_R": 16, **config}
    close(tq.quant_linear(x, qweight, scales, zeros, bits, group, inp, None, u, v, config=cfg),
          quant_ref(x, qweight, scales, zeros, bits, group, inp, None, u, v), torch.float32)


def test_quant_exact_multiple_noncontiguous_and_errors():
    inp, out, bits, group = 128, 20, 3, 32
    qweight, scales, zeros = quant_case(out, inp, bits, group)
    x = torch.randn(5, 2, inp, generator=gen(6)).transpose(0, 1)
    assert not x.is_contiguous()
    close(tq.quant_linear(x, qweight, scales, zeros, bits, group, inp),
          quant_ref(x, qweight, scales, zeros, bits, group, inp), torch.float32)
    with pytest.raises(ValueError, match="packed layout"):
        tq.quant_linear(x, qweight, scales, zeros, 4, group, inp)
    with pytest.raises(ValueError, match="input features"):
        tq.quant_linear(x[..., :100], qweight, scales, zeros, bits, group, inp)


# ------------------------------------------------------------------------------- dispatch and modules
def test_dispatch_runs_triton_under_interpreter():
    from hf_compress import kernels

    kernels.refresh_backend()
    assert kernels.kernel_mode() == "triton" and kernels.backend_for(torch.zeros(1)) == "triton"


def test_modules_forward_and_backward_through_kernels():
    from hf_compress.kernels import dispatch
    from hf_compress.modules import LowRankLinear, QuantLinear

    dispatch.refresh_backend()
    torch.manual_seed(0)
    lr = LowRankLinear(40, 24, 7)
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = lr(x)
    y_ref = reference.lowrank_linear(x, lr.U, lr.V, lr.bias)
    close(y.detach(), y_ref.detach(), torch.float32)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, lr.U, lr.V], gy)
    grads_ref = torch.autograd.grad(y_ref, [x, lr.U, lr.V], gy)
    for a, b in zip(grads, grads_ref):
        close(a, b, torch.float32)

    qweight, scales, zeros = quant_case(24, 40, 4, 32)
    g = gen(7)
    q = QuantLinear.from_codes(qweight, scales, zeros, 4, 32, 40, bias=torch.randn(24, generator=g),
                               u=torch.randn(24, 5, generator=g) * 0.1, v=torch.randn(5, 40, generator=g) * 0.1)
    with torch.no_grad():
        close(q(x), reference.quant_linear(x, qweight, scales, zeros, 4, 32, 40, q.bias, q.U, q.V), torch.float32)
    y = q(x)
    (gu,) = torch.autograd.grad(y.sum(), [q.U])
    (gu_ref,) = torch.autograd.grad(
        reference.quant_linear(x, qweight, scales, zeros, 4, 32, 40, q.bias, q.U, q.V).sum(), [q.U])
    close(gu, gu_ref, torch.float32)


def test_compressed_model_matches_torch_backend():
    """A tiny Llama, low-rank compressed, gives the same logits through the kernels as through the reference."""
    import hf_compress
    from conftest import make_tiny
    from hf_compress.kernels import dispatch

    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
    ids = torch.randint(3, 96, (1, 9), generator=gen(8))
    dispatch.refresh_backend()
    with torch.no_grad():
        prefill = model(input_ids=ids).logits       # 9 rows: decode kernels; the batch below: prefill tiling
        batch = model(input_ids=ids.repeat(3, 1)).logits
    os.environ["HF_COMPRESS_KERNELS"] = "torch"
    try:
        dispatch.refresh_backend()
        with torch.no_grad():
            ref_prefill = model(input_ids=ids).logits
            ref_batch = model(input_ids=ids.repeat(3, 1)).logits
    finally:
        os.environ["HF_COMPRESS_KERNELS"] = "triton"
        dispatch.refresh_backend()
    assert float((prefill - ref_prefill).abs().max()) < 1e-4 * float(ref_prefill.abs().max()) + 1e-5
    assert float((batch - ref_batch).abs().max()) < 1e-4 * float(ref_batch.abs().max()) + 1e-5


@pytest.mark.parametrize("cfg", [
    {"method": "rtn", "bits": 4, "group_size": 32, "eora_rank": 4},        # QuantLinear + fused low-rank term
    {"method": "svd", "ratio": 0.3, "bits": 3, "group_size": 16},          # QuantLowRankLinear: two quant GEMMs
], ids=["rtn4+eora", "svd+3bit-factors"])
def test_quantized_model_matches_torch_backend(cfg):
    import hf_compress
    from conftest import make_tiny
    from hf_compress.kernels import dispatch

    model = make_tiny("llama")
    hf_compress.compress(model, cfg, progress=False)
    ids = torch.randint(3, 96, (1, 5), generator=gen(9))
    outs = {}
    for mode in ("torch", "triton"):
        os.environ["HF_COMPRESS_KERNELS"] = mode
        dispatch.refresh_backend()
        with torch.no_grad():
            outs[mode] = (model(input_ids=ids[:, :1]).logits, model(input_ids=ids.repeat(4, 1)).logits)
    for got, want in zip(outs["triton"], outs["torch"]):
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max()) + 1e-5


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_compressed_experts_run_the_triton_kernels(arch):
    """Compressed experts (each expert's layer a QuantLinear) through the Triton kernels equal the reference."""
    import hf_compress
    from hf_compress.kernels import dispatch
    from test_moe import tiny_moe

    model = tiny_moe(arch)
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16}, progress=False)
    ids = torch.randint(3, 96, (1, 5), generator=gen(10))
    outs = {}
    for mode in ("torch", "triton"):
        os.environ["HF_COMPRESS_KERNELS"] = mode
        dispatch.refresh_backend()
        with torch.no_grad():
            outs[mode] = (model(input_ids=ids[:, :1]).logits, model(input_ids=ids.repeat(2, 1)).logits)
    for got, want in zip(outs["triton"], outs["torch"]):
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max()) + 1e-5
