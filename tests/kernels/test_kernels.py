"""Kernel dispatch (HF_COMPRESS_KERNELS, cached once per process), the interpreter suite in its own process, and
on machines with a GPU the Triton kernels against the references at real sizes."""

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_python
from hf_compress import kernels
from hf_compress.kernels import dispatch
from hf_compress.kernels.reference import weights as reference


@pytest.fixture(autouse=True)
def _fresh_mode():
    dispatch.kernel_mode.cache_clear()
    yield
    dispatch.kernel_mode.cache_clear()  # re-read lazily, after monkeypatch has restored the environment


def _lowrank_args(m=3, k=20, n=12, r=5, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, v, u, b = (torch.randn(m, k, generator=g), torch.randn(r, k, generator=g), torch.randn(n, r, generator=g),
                  torch.randn(n, generator=g))
    return [t.to(device=device, dtype=dtype) for t in (x, u, v, b)]


def test_mode_is_read_once_and_refreshed(monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    assert kernels.refresh_backend() == "torch"
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "TRITON")
    assert kernels.kernel_mode() == "torch"  # cached: not re-read on every forward
    assert kernels.refresh_backend() == "triton"
    monkeypatch.delenv("HF_COMPRESS_KERNELS")
    assert kernels.refresh_backend() == "auto"


def test_invalid_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="must be auto, torch, triton or cpu"):
        kernels.refresh_backend()
    with pytest.raises(ValueError, match="must be auto, torch, triton or cpu"):
        kernels.lowrank_linear(*_lowrank_args())


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_cpu_tensors_take_the_reference(monkeypatch, mode):
    """torch: the reference; auto: the CPU backend, which runs the reference for low-rank layers and for quantized
    ones called without a cache (tests/kernels/test_cpu_kernels.py covers the int4 kernel path)."""
    monkeypatch.setenv("HF_COMPRESS_KERNELS", mode)
    kernels.refresh_backend()
    x, u, v, b = _lowrank_args()
    assert kernels.backend_for(x) == ("cpu" if mode == "auto" else "torch")
    assert torch.equal(kernels.lowrank_linear(x, u, v, b), reference.lowrank_linear(x, u, v, b))
    codes = torch.randint(0, 16, (7, 20), generator=torch.Generator().manual_seed(0))
    qw, s, z = reference.pack(codes, 4), torch.rand(7, 1).half(), torch.full((7, 1), 8.0).half()
    assert torch.equal(kernels.quant_linear(x, qw, s, z, 4, 32, 20, None, u[:7], v),
                       reference.quant_linear(x, qw, s, z, 4, 32, 20, None, u[:7], v))


def test_forced_triton_on_cpu_needs_the_interpreter():
    proc = run_python("""
        import torch
        from hf_compress import kernels
        try:
            kernels.lowrank_linear(torch.ones(1, 4), torch.ones(3, 2), torch.ones(2, 4), None)
        except RuntimeError as e:
            print("ERR", e)
    """, env={"HF_COMPRESS_KERNELS": "triton", "TRITON_INTERPRET": "0"})
    assert "ERR" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout, proc.stdout


def test_without_triton_auto_falls_back_and_forced_triton_says_why():
    proc = run_python("""
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch
        from hf_compress import kernels
        assert not kernels.triton_available()
        x = torch.ones(1, 4)
        print("AUTO", kernels.backend_for(x))
        import os
        os.environ["HF_COMPRESS_KERNELS"] = "triton"
        kernels.refresh_backend()
        try:
            kernels.backend_for(x)
        except RuntimeError as e:
            print("ERR", e)
    """)
    # auto: a CPU tensor takes the CPU kernels (no Triton needed); forced triton says why it cannot run
    assert "AUTO cpu" in proc.stdout and "ERR HF_COMPRESS_KERNELS=triton but Triton is not importable" in proc.stdout


def test_triton_kernels_under_interpreter():
    """tests/kernels/test_kernels_interpret.py (every kernel vs its reference) in a process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_COMPRESS_KERNELS": "triton", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           os.path.join("tests", "kernels", "test_kernels_interpret.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"interpreter suite failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "passed" in summary and "skipped" not in summary, summary
    print(f"interpreter suite: {summary} ({time.time() - start:.0f}s)")


# ------------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 5, 16, 17, 300])
@pytest.mark.parametrize("k,n,r", [(4096, 4096, 1638), (4096, 11008, 819), (333, 517, 45)])
def test_gpu_lowrank(monkeypatch, dtype, m, k, n, r):
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
    kernels.refresh_backend()
    x, u, v, b = _lowrank_args(m, k, n, r, device="cuda", dtype=dtype)
    v, u = v / k**0.5, u / r**0.5
    assert kernels.backend_for(x) == "triton"
    y = kernels.lowrank_linear(x, u, v, b)
    assert y.dtype == dtype and _rel(y, reference.lowrank_linear(x, u, v, b)) < TOL[dtype]


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 7, 200])
@pytest.mark.parametrize("k,n,g,r", [(4096, 4096, 128, 0), (11008, 4096, 128, 64), (1000, 300, 64, 17)])
def test_gpu_quant(monkeypatch, bits, m, k, n, g, r):
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
    kernels.refresh_backend()
    gen = torch.Generator().manual_seed(bits)
    ng = -(-k // g)
    qw = reference.pack(torch.randint(0, 2**bits, (n, k), generator=gen), bits).cuda()
    s = (torch.rand(n, ng, generator=gen) * 0.02 + 0.001).half().cuda()
    z = (torch.rand(n, ng, generator=gen) * (2**bits - 1)).half().cuda()
    x = torch.randn(m, k, generator=gen).half().cuda()
    u = (torch.randn(n, r, generator=gen) * 0.05).half().cuda() if r else None
    v = (torch.randn(r, k, generator=gen) * 0.05).half().cuda() if r else None
    y = kernels.quant_linear(x, qw, s, z, bits, g, k, None, u, v)
    assert _rel(y, reference.quant_linear(x, qw, s, z, bits, g, k, None, u, v)) < TOL[torch.float16]


def test_kernels_compile_for_gpu_targets_without_a_gpu():
    """Triton's ahead-of-time compiler lowers a representative config of every kernel path to a cubin for
    sm_90 (no GPU needed): catches codegen errors the interpreter cannot see. (Every autotune config of every
    kernel was compiled this way for sm_90 and sm_80, fp16/bf16/fp32, bits 2/3/4/8 when they were written.)"""
    proc = run_python("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from hf_compress.kernels.triton import lowrank as L, weights as Q

        def build(fn, ptrs, consts, cfg, arch):
            consts = {**consts, **cfg.kwargs}
            sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            assert k.asm["cubin"]

        mm = {"a_ptr": "*fp16", "b_ptr": "*fp16", "bias_ptr": "*fp16", "c_ptr": "*fp16"}
        lr = {"x_ptr": "*bf16", "v_ptr": "*bf16", "u_ptr": "*bf16", "bias_ptr": "*bf16", "ws_ptr": "*fp32",
              "cnt_ptr": "*i32", "out_ptr": "*bf16"}
        q = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "t_ptr": "*fp16",
             "u_ptr": "*fp16", "bias_ptr": "*fp16", "y_ptr": "*fp16"}
        qlr = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "v_ptr": "*fp16",
               "u_ptr": "*fp16", "bias_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "y_ptr": "*fp16"}
        base = dict(HAS_BIAS=True, PREC="tf32", UPCAST=False)
        for arch in (90,):
            build(L._mm_nt_kernel, mm, base, L._MM_GEMV[0], arch)
            build(L._mm_nt_kernel, mm, base, L._MM_LARGE[0], arch)
            build(L._lowrank_decode_kernel, lr, {**base, "FIXUP": True}, L._LR_GEMV[0], arch)
            build(L._lowrank_decode_kernel, lr, {**base, "FIXUP": True}, L._LR_SMALL[0], arch)
            for bits, cfg in ((4, Q._Q_GEMV[0]), (3, Q._Q_SMALL[0]), (3, Q._Q_LARGE[0]), (2, Q._Q_LARGE[0])):
                build(Q._quant_mm_kernel, q, {**base, "BITS": bits, "G": 128, "HAS_LR": True}, cfg, arch)
            for bits, cfg in ((4, Q._QLR_GEMV[0]), (3, Q._QLR_GEMV[-1]), (4, Q._QLR_SMALL[0]), (2, Q._QLR_SMALL[-1])):
                build(Q._quant_lr_decode_kernel, qlr, {**base, "BITS": bits, "G": 128, "FIXUP": True}, cfg, arch)
        print("COMPILED")
    """, env={"TRITON_INTERPRET": "0"}, check=False)
    if "COMPILED" not in proc.stdout and ("ptxas" in proc.stderr or "No module named 'triton'" in proc.stderr):
        pytest.skip(f"no Triton NVIDIA toolchain here: {proc.stderr.strip().splitlines()[-1]}")
    assert "COMPILED" in proc.stdout, proc.stderr[-4000:]
