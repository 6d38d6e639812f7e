"""Calibrated low-rank compression: statistics, whitening, methods and allocation against references."""

import itertools
import logging

import pytest
import torch

import hf_compress
from hf_compress import CompressionConfig, ConfigError, HfCompressError, LowRankLinear
from hf_compress.allocation import allocate_energy, max_ratio
from hf_compress.calibration import LayerStats, calibration_windows
from hf_compress.methods import get_method
from hf_compress.methods.base import LowRankMethod
from hf_compress.methods.linalg import whitening
from hf_compress.registry import METHODS

from conftest import VOCAB, make_tiny, output_of


def _stats(x, x_ref=None):
    st = LayerStats()
    st.add(x, x_ref, need_cross=x_ref is not None)
    return st


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_layer_stats_match_direct_products():
    g = _gen()
    x, xr = torch.randn(3, 50, 8, generator=g), torch.randn(3, 50, 8, generator=g)
    st = _stats(x, xr)
    X, XR = x.reshape(-1, 8).double(), xr.reshape(-1, 8).double()
    assert torch.allclose(st.gram, X.T @ X) and torch.allclose(st.cross, XR.T @ X) and torch.allclose(st.ref_gram, XR.T @ XR)
    assert torch.allclose(st.absmean, X.abs().mean(0)) and st.count == 150
    both = st.merged(_stats(x[:1], xr[:1]))
    assert both.count == 200 and torch.allclose(both.gram, X.T @ X + X[:50].T @ X[:50])


def test_non_finite_statistics_name_the_layer():
    st = _stats(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(HfCompressError, match="model.layers.3.mlp.down_proj"):
        st.check_finite("model.layers.3.mlp.down_proj")


def test_whitening_full_rank_and_rank_deficient(caplog):
    g = _gen()
    x = torch.randn(200, 6, generator=g).double()
    s, s_inv = whitening(x.T @ x)
    assert torch.allclose(s @ s.T, x.T @ x, atol=1e-8) and torch.allclose(s @ s_inv, torch.eye(6, dtype=s.dtype), atol=1e-8)
    x[:, 5] = 0  # a dead channel: singular Gram, as real data produces
    x[:, 4] = x[:, 3]
    with caplog.at_level(logging.INFO, logger="hf_compress.methods.linalg"):
        s, s_inv = whitening(x.T @ x, "layer")
    assert torch.isfinite(s).all() and torch.isfinite(s_inv).all()
    assert torch.allclose(s @ s.T, x.T @ x, atol=1e-4 * (x.T @ x).diagonal().mean())
    assert "whitening layer" in caplog.text


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_svd_llm_attains_the_whitened_optimum(rank):
    g = _gen(1)
    x = torch.randn(400, 10, generator=g) @ torch.randn(10, 10, generator=g)  # correlated inputs
    w = torch.randn(12, 10, generator=g)
    st = _stats(x)
    u, v = get_method("svd_llm")(compensation="off").factorize(w, rank, st)
    err = torch.linalg.matrix_norm(x.double() @ (w.double() - (u @ v).double()).T)
    s, _ = whitening(st.gram)
    sig = torch.linalg.svdvals(w.double() @ s)
    assert err.item() == pytest.approx(sig[rank:].pow(2).sum().sqrt().item(), rel=1e-6)
    # and no worse than plain SVD in output error
    u2, v2 = get_method("svd")().factorize(w, rank)
    assert err <= torch.linalg.matrix_norm(x.double() @ (w.double() - (u2 @ v2).double()).T) + 1e-9


def test_svd_llm_full_compensation_is_least_squares():
    g = _gen(2)
    x_ref = torch.randn(300, 8, generator=g)
    x_c = x_ref + 0.3 * torch.randn(300, 8, generator=g)  # the compressed model's inputs drift
    w = torch.randn(5, 8, generator=g)
    u, v = get_method("svd_llm")(compensation=1.0).factorize(w, 5, _stats(x_c, x_ref))
    # full rank min(5, 8): W' = argmin ‖X_c W'ᵀ − X_ref Wᵀ‖ (unconstrained least squares)
    lstsq = torch.linalg.lstsq(x_c.double(), (x_ref @ w.T).double()).solution.T
    assert torch.allclose((u @ v).double(), lstsq, atol=1e-4)


def test_svd_llm_auto_picks_beta_on_heldout():
    g = _gen(3)
    x_ref = torch.randn(600, 8, generator=g)
    x_c = x_ref @ (torch.eye(8) + 0.2 * torch.randn(8, 8, generator=g))
    w = torch.randn(6, 8, generator=g)
    m = get_method("svd_llm")()
    m.factorize(w, 3, _stats(x_c[:500], x_ref[:500]), _stats(x_c[500:], x_ref[500:]))
    assert m.last_beta > 0  # a systematic drift is worth compensating


def test_asvd_and_fwsvd_formulas():
    g = _gen(4)
    x = torch.randn(100, 7, generator=g) * torch.linspace(0.1, 3, 7)
    w = torch.randn(9, 7, generator=g)
    st = _stats(x)
    st.fisher_rows = torch.rand(9, generator=g).double() + 0.1
    for name, kw in (("asvd", {"alpha": 0.5}), ("fwsvd", {})):
        u, v = get_method(name)(**kw).factorize(w, 7, st)  # full rank: exact
        assert torch.allclose(u @ v, w, atol=1e-5)
    s = st.absmean.pow(0.5)
    u, v = get_method("asvd")().factorize(w, 2, st)
    uu, ss, vh = torch.linalg.svd(w.double() * s)
    assert torch.allclose((u @ v).double(), (uu[:, :2] * ss[:2]) @ vh[:2] / s, atol=1e-5)


def test_energy_allocation_is_knapsack_optimal_on_small_case():
    g = _gen(5)
    shapes = {"a": (6, 4), "b": (5, 5), "c": (8, 3)}
    spectra = {n: torch.sort(torch.rand(min(s), generator=g) ** k, descending=True).values
               for (n, s), k in zip(shapes.items(), (1, 4, 2))}
    ratio = 0.45
    plan = allocate_energy(spectra, shapes, ratio)
    budget = (1 - ratio) * sum(o * i for o, i in shapes.values())

    def cost_err(n, r):
        o, i = shapes[n]
        if r is None:
            return o * i, 0.0
        s2 = spectra[n].double() ** 2
        return r * (o + i), float(s2[r:].sum() / s2.sum())

    got_cost = sum(cost_err(n, r)[0] for n, r in plan.items())
    got_err = sum(cost_err(n, r)[1] for n, r in plan.items())
    assert got_cost <= budget
    best = min(sum(cost_err(n, r)[1] for n, r in zip(shapes, combo))
               for combo in itertools.product(*[[None, *range(1, min(s) + 1)] for s in shapes.values()])
               if sum(cost_err(n, r)[0] for n, r in zip(shapes, combo)) <= budget)
    # Lagrangian relaxation: optimal up to the one layer whose choice straddles the multiplier
    assert got_err <= best + max(float(s[0] ** 2 / (s ** 2).sum()) for s in spectra.values())


def test_energy_allocation_infeasible_ratio_gives_range():
    shapes = {"a": (10, 10), "b": (20, 10)}
    top = max_ratio(shapes)
    with pytest.raises(ConfigError, match=rf"feasible range is \(0, {top:.4f}\]"):
        allocate_energy({"a": torch.ones(10), "b": torch.ones(10)}, shapes, 0.99)


def test_windows_seeded_and_sources(tiny_tokenizer, tmp_path):
    text = "Some calibration text about kings and queens. " * 100
    a = calibration_windows(text.split(". "), tiny_tokenizer, nsamples=4, seqlen=16, seed=0)
    b = calibration_windows(text.split(". "), tiny_tokenizer, nsamples=4, seqlen=16, seed=0)
    c = calibration_windows(text.split(". "), tiny_tokenizer, nsamples=4, seqlen=16, seed=1)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    f = tmp_path / "calib.txt"
    f.write_text(text)
    assert calibration_windows(str(f), tiny_tokenizer, nsamples=2, seqlen=16).shape == (2, 16)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [text, "", text]})
    assert calibration_windows(ds, tiny_tokenizer, nsamples=2, seqlen=16).shape == (2, 16)
    with pytest.raises(ConfigError, match="shorter than one window of 512"):
        calibration_windows(["short text"], tiny_tokenizer, nsamples=2, seqlen=512)
    with pytest.raises(ConfigError, match="no 'text' column"):
        calibration_windows(datasets.Dataset.from_dict({"body": [text]}), tiny_tokenizer)


@METHODS.register("_recording_test")
class _Recording(LowRankMethod):
    """Plain SVD that records the Gram it was given (to check the sequential engine)."""
    needs = frozenset({"gram"})
    seen: dict = {}

    def spectrum(self, weight, stats=None):
        return torch.linalg.svdvals(weight.double())

    def factorize(self, weight, rank, stats=None, heldout=None):
        _Recording.seen[weight.data_ptr()] = stats.gram.clone()
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequential_statistics_are_those_of_the_compressed_model(arch):
    model = make_tiny(arch)
    ids = torch.randint(3, 96, (6, 16), generator=_gen(6))
    from hf_compress.targets import dense_weight, find_targets

    weights = {n: dense_weight(m).data_ptr() for n, m in find_targets(model, None, []).items()}
    _Recording.seen.clear()
    hf_compress.compress(model, {"method": "_recording_test", "ratio": 0.5, "alloc": "uniform",
                                 "calibration": {"nsamples": 6, "seqlen": 16, "batch_size": 4}}, calibration=ids,
                         progress=False)
    # Reference: run the final compressed model and take each compressed layer's real inputs. A layer's input
    # depends only on layers before it, so it must equal what the sequential pass saw.
    grams = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: grams.__setitem__(n, grams.get(n, 0) + (lambda x: x.T @ x)(a[0].reshape(-1, a[0].shape[-1]).double())))
             for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    output_of(model, ids)
    for h in hooks:
        h.remove()
    assert len(grams) == len(_Recording.seen) > 0
    for n, ptr in weights.items():
        if ptr in _Recording.seen and n in grams:
            assert torch.allclose(_Recording.seen[ptr], grams[n], rtol=1e-6, atol=1e-6), n


def test_calibrated_method_without_data_and_on_load(tmp_path):
    model = make_tiny("llama")
    with pytest.raises(ConfigError, match="needs calibration data"):
        hf_compress.compress(model, {"method": "svd_llm", "ratio": 0.3}, progress=False)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match="cannot run inside from_pretrained"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressionConfig(method="svd_llm", ratio=0.3))


def test_too_few_tokens_warns_with_number(caplog):
    model = make_tiny("llama")
    ids = torch.randint(3, 96, (2, 16), generator=_gen(7))
    with caplog.at_level(logging.WARNING, logger="hf_compress.pipelines.sequential"):
        hf_compress.compress(model, {"method": "asvd", "ratio": 0.3, "calibration": {"nsamples": 2, "seqlen": 16}},
                             calibration=ids, progress=False)
    assert "Only 32 calibration tokens" in caplog.text


@pytest.mark.parametrize("method", ["svd_llm", "asvd", "fwsvd"])
def test_calibrated_roundtrip_with_varied_ranks(method, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny("llama")
    ids = torch.randint(3, 96, (16, 32), generator=_gen(8))
    hf_compress.compress(model, {"method": method, "ratio": 0.4, "calibration": {"nsamples": 16, "seqlen": 32}},
                         calibration=ids, progress=False)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = ids[:2, :10]
    assert (output_of(again, x) - output_of(model, x)).abs().max().item() <= 1e-5
    q = again.config.quantization_config
    assert q.method == method and q.alloc is None and q.calibration["nsamples"] == 16


def test_loss_allocation_meets_budget_and_roundtrips(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_compress.targets import find_targets, shape_of

    model = make_tiny("llama")
    shapes = {n: shape_of(m) for n, m in find_targets(model, None, []).items()}
    ids = torch.randint(3, 96, (16, 32), generator=_gen(9))
    hf_compress.compress(model, {"method": "svd_llm", "ratio": 0.4, "alloc": "loss",
                                 "calibration": {"nsamples": 16, "seqlen": 32}}, calibration=ids, progress=False)
    kept = 0
    for name, (o, i) in shapes.items():
        m = model.get_submodule(name)
        kept += m.rank * (o + i) if isinstance(m, LowRankLinear) else o * i
    assert kept <= 0.6 * sum(o * i for o, i in shapes.values())
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (output_of(again, ids[:2]) - output_of(model, ids[:2])).abs().max().item() <= 1e-5


def test_dense_correction_is_heldout_selected_least_squares():
    g = _gen(10)
    x_ref = torch.randn(700, 8, generator=g)
    x_c = x_ref @ (torch.eye(8) + 0.3 * torch.randn(8, 8, generator=g))
    w = torch.randn(5, 8, generator=g)
    m = get_method("svd_llm")(correct_dense=True)
    new = m.correct(w, _stats(x_c[:600], x_ref[:600]), _stats(x_c[600:], x_ref[600:]))
    assert new is not None and m.last_beta == 1.0  # a clean linear drift: full correction wins
    lstsq = torch.linalg.lstsq(x_c.double(), (x_ref @ w.T).double()).solution.T
    assert torch.allclose(new.double(), lstsq, atol=1e-4)
    # the chosen correction never makes the held-out error worse than leaving the layer as it is
    m2 = get_method("svd_llm")(correct_dense=True)
    st, val = _stats(x_c[:600], x_ref[:600]), _stats(x_c[600:], x_ref[600:])
    new2 = m2.correct(w, st, val)
    eye = torch.eye(8, dtype=torch.float64)
    assert m2._heldout_error(w.double(), new2.double(), eye, val) <= m2._heldout_error(w.double(), w.double(), eye, val)


def test_disk_offloaded_model_compresses_like_in_memory(tmp_path):
    """accelerate offload (every block on disk): the sequential engine reads weights through the offload hooks.
    Embeddings, norm and head stay on the CPU: accelerate < 1.15 refuses a model entirely on disk."""
    from transformers import AutoModelForCausalLM

    make_tiny("llama").save_pretrained(tmp_path / "dense")
    ids = torch.randint(3, 96, (16, 32), generator=_gen(11))
    cfg = {"method": "svd_llm", "ratio": 0.4, "calibration": {"nsamples": 16, "seqlen": 32}}
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    hf_compress.compress(ref, cfg, calibration=ids, progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                               offload_folder=str(tmp_path / "offload"))
    assert off.hf_device_map["model.layers"] == "disk" and off.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    hf_compress.compress(off, cfg, calibration=ids, progress=False)
    x = ids[:2, :10]
    assert (output_of(off, x) - output_of(ref, x)).abs().max().item() <= 1e-5
    off.save_pretrained(tmp_path / "c")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert (output_of(again, x) - output_of(ref, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_capture_stops_at_the_last_block_with_every_call_recorded(arch):
    # The capture forward records each block's call and stops as the last block is called: the LM head never
    # runs, only block 0 is computed (the others pass their input through and their layers never run), and a
    # block run from the records reproduces the full model's hidden states exactly.
    from hf_compress.calibration import BlockwiseRunner
    from hf_compress.targets import find_blocks
    from hf_compress.targets import find_targets

    model = make_tiny(arch, layers=3)
    windows = torch.randint(3, VOCAB, (5, 12), generator=_gen(3))
    prefix, blocks = find_blocks(model, find_targets(model, None, []))
    calls = {"head": 0, "last": 0, "layers of block 1": 0, "block 1": 0}
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    blocks[-1].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    blocks[1].register_forward_hook(lambda *a: calls.__setitem__("block 1", calls["block 1"] + 1))
    for m in blocks[1].modules():
        if m is not blocks[1]:
            m.register_forward_hook(lambda *a: calls.__setitem__("layers of block 1", calls["layers of block 1"] + 1))
    runner = BlockwiseRunner(model, blocks, windows, batch_size=2)
    runner.capture()
    assert calls == {"head": 0, "last": 0, "layers of block 1": 0, "block 1": 3}
    assert all("forward" not in b.__dict__ for b in blocks)  # the class's forward is back
    assert [len(r) for r in runner.inputs] == [3] * len(blocks) and len(runner.hidden) == 3
    with torch.no_grad():
        full = model(input_ids=windows[:2], output_hidden_states=True).hidden_states
    hidden = runner.hidden
    for i, block in enumerate(blocks[:-1]):
        hidden = runner.run(i, block, hidden)
        assert torch.equal(hidden[0], full[i + 1])  # bit for bit: the same computation as the model's own forward


def test_asvd_collects_no_gram_and_matches_its_formula():
    # asvd reads only mean |x|: the engine accumulates no Gram for it, and its factors are the scaled SVD's
    model = make_tiny("llama")
    ids = torch.randint(3, VOCAB, (8, 16), generator=_gen(4))
    seen = []
    orig = LayerStats.add

    def spy(self, *a, **kw):
        orig(self, *a, **kw)
        seen.append(self.gram is None)
    LayerStats.add = spy
    try:
        hf_compress.compress(model, {"method": "asvd", "ratio": 0.5, "alloc": "uniform",
                                     "calibration": {"nsamples": 8, "seqlen": 16}}, calibration=ids, progress=False)
    finally:
        LayerStats.add = orig
    assert seen and all(seen)
    w = torch.randn(6, 10, generator=_gen(5))
    x = torch.randn(40, 10, generator=_gen(6))
    st = LayerStats()
    st.add(x, need_gram=False)
    assert st.gram is None and torch.allclose(st.absmean, x.double().abs().mean(0))
    u, v = get_method("asvd")().factorize(w, 3, st)
    s = x.double().abs().mean(0).sqrt()
    uu, ss, vh = torch.linalg.svd(w.double() * s, full_matrices=False)
    assert torch.allclose(u.double() @ v.double(), (uu[:, :3] * ss[:3]) @ vh[:3] / s, atol=1e-5)


@pytest.mark.parametrize("n, block", [(200, 64), (192, 64), (50, 64), (7, 1)])
def test_add_gram_equals_the_full_product_and_is_symmetric(n, block):
    # the block lower triangle's products plus mirrored copies: the accumulated xᵀx up to rounding, over batches
    from hf_compress.calibration import add_gram

    xs = [torch.randn(33, n, generator=_gen(20 + b), dtype=torch.float64) * torch.linspace(0.01, 30, n, dtype=torch.float64)
          for b in range(3)]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for x in xs:
        add_gram(gram, x, block)
    full = sum(x.T @ x for x in xs)
    assert (gram - full).abs().max().item() <= 1e-13 * full.abs().max().item()
    off = torch.ones(n, n, dtype=torch.bool)
    for i in range(0, n, block):
        off[i : i + block, i : i + block] = False
    assert torch.equal(gram[off], gram.T[off])


def test_svd_llm_spectra_share_one_whitening_per_gram_bit_for_bit():
    # one Cholesky factor per Gram for the layers that share it, no S⁻¹: the very spectra of one whitening per layer
    from hf_compress.methods import linalg

    x = torch.randn(300, 12, generator=_gen(30)).double()
    shared = x.T @ x
    x2 = x.clone()
    x2[:, 11] = 0  # rank-deficient: the damping ladder, as in `whitening`
    deficient = x2.T @ x2
    stats = {"q": LayerStats(gram=shared), "k": LayerStats(gram=shared), "d": LayerStats(gram=deficient)}
    weights = {"q": torch.randn(12, 12, generator=_gen(31)), "k": torch.randn(4, 12, generator=_gen(32)),
               "d": torch.randn(5, 12, generator=_gen(33))}
    method = get_method("svd_llm")()
    calls = []
    orig = linalg.whitening_factor

    def counting(gram, name=""):
        calls.append(gram)
        return orig(gram, name)
    import hf_compress.methods.svd_llm as mod
    mod.whitening_factor = counting
    try:
        got = method.spectra(stats, weights.__getitem__)
    finally:
        mod.whitening_factor = orig
    assert len(calls) == 2  # the shared Gram is factored once
    for n, st in stats.items():
        s, _ = whitening(st.gram)
        assert torch.equal(got[n], torch.linalg.svdvals(weights[n].double() @ s))
        assert torch.equal(method.spectrum(weights[n], st), got[n])
    assert torch.equal(linalg.whitening_factor(deficient), whitening(deficient)[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_svd_llm_spectra_from_output_grams_equal_the_whitened_ones(arch):
    # layers with fewer outputs than inputs take their spectrum from Σ y yᵀ (bias removed) instead of the
    # whitened W·S of the input Gram: the same singular values up to rounding
    from hf_compress.calibration import BlockwiseRunner
    from hf_compress.targets import find_blocks
    from hf_compress.statistics import collect as _collect
    from hf_compress.targets import dense_weight, find_targets, shape_of

    model = make_tiny(arch)
    with torch.no_grad():
        for m in model.modules():  # gpt2's Conv1D biases start at zero: make them count
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.5, generator=_gen(40))
    ids = torch.randint(3, 96, (8, 16), generator=_gen(41))
    targets = find_targets(model, None, [])
    prefix, blocks = find_blocks(model, targets)
    runner = BlockwiseRunner(model, blocks, ids, batch_size=4)
    runner.capture()
    method = get_method("svd_llm")()
    layers = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.0.")}
    by_out = {n for n, m in layers.items() if method.spectrum_from_outputs(*shape_of(m))}
    assert by_out and by_out != set(layers)
    weight_of = lambda n: dense_weight(targets[n]).detach().float()  # noqa: E731
    ref = method.spectra(_collect(runner, 0, blocks[0], layers, runner.hidden, 2, {}), weight_of)
    stats = _collect(runner, 0, blocks[0], layers, runner.hidden, 2, {}, output_gram=by_out)
    got = method.spectra(stats, weight_of)
    for n in layers:
        if n in by_out:
            assert stats[n].gram is None and stats[n].out_gram is not None and stats[n].count == 8 * 16
            assert got[n].shape == ref[n].shape
            assert torch.allclose(got[n], ref[n], rtol=0, atol=1e-5 * ref[n][0].item()), n
            assert torch.all(got[n][:-1] >= got[n][1:])
        else:
            assert torch.equal(got[n], ref[n]), n
