"""`compress(model, config)`: compress a loaded transformers model in place.

Data-free methods factorize each targeted weight directly. Calibrated methods run block by block
(`hf_compress.calibration.BlockwiseRunner`):

1. capture every block's inputs for the calibration windows (one forward of the model, block 0 alone computed);
2. when ranks are allocated from measurements: one pass over the blocks on the dense stream, collecting each
   layer's statistics, keeping only its spectrum, then `allocate_energy` under the global budget;
3. the compression pass, block i at a time: inside the block, layers that share an input (q/k/v; o; gate/up;
   down) are fitted group by group on the inputs the *compressed* model really produces (blocks 0..i-1 and the
   block's earlier groups already compressed) against the dense model's inputs where the method compensates;
   then the compressed block produces block i+1's inputs. One block and the calibration activations are what
   is held at any time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time

import torch
from accelerate.utils import align_module_device
from torch import nn
from tqdm.auto import tqdm

from .allocation import allocate_energy, plan_ranks
from .calibration import BlockwiseRunner, LayerStats, calibration_windows, device_of, find_blocks, input_groups
from .config import CompressionConfig
from .errors import CheckpointError, ConfigError, NonFiniteWeightError
from .progress import Progress
from .resume import Checkpoint, fingerprint, scratch_folder
from .methods import get_method
from .kernels import pack
from .methods.eora import eora_factors
from .modules import LowRankLinear, QuantLinear, QuantLowRankLinear
from .modules.quant import WEIGHT_SCALE_DTYPES
from .targets import dense_weight, find_targets, set_module, shape_of, source_of

logger = logging.getLogger(__name__)


def compress(model: nn.Module, config: CompressionConfig | dict | str, *, calibration=None, tokenizer=None,
             progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
             checkpoint_every: float = 60.0) -> nn.Module:
    """Compress ``model`` in place according to ``config`` and return it.

    ``calibration`` (calibrated methods): a text file path, a list of strings, a ``datasets.Dataset`` (``text``
    column) or a tensor of token ids; ``tokenizer`` tokenizes text sources. The model keeps its class
    (``LlamaForCausalLM`` stays ``LlamaForCausalLM``); targeted layers become compressed modules, and the model is
    marked so that ``save_pretrained`` writes an hf-compress checkpoint.

    ``checkpoint_dir``: make the run resumable (`hf_compress.resume`): finished blocks are checkpointed there as
    safetensors (the sequential engine's streams at most every ``checkpoint_every`` seconds); when the folder
    already holds a run with the same settings, compression continues after its last committed block and the
    result equals an uninterrupted run bit for bit. Delete the folder once the model is saved. The compressed
    layers of blocks that accelerate offloaded (``device_map`` with ``"disk"``/``"cpu"`` offload) are read from
    their files there, memory-mapped, once their block is written, so that finished blocks do not accumulate in RAM
    (on Linux a mapped file may be deleted: the mapping keeps its bytes). Without ``checkpoint_dir`` an offloaded
    model gets the same release through a scratch folder in accelerate's offload folder (else the temp dir),
    deleted when the call returns (`hf_compress.resume.scratch_folder`); its files' disk space is freed with the
    model.
    """
    from .quantizer import attach

    config = CompressionConfig.coerce(config)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ConfigError("This model is already compressed/quantized; load the dense model to compress it again.")
    from .kv.hook import calibrate_kv, kv_only

    if not kv_only(config):
        if checkpoint_dir is None:  # an offloaded model still gets its finished blocks out of RAM
            folder = scratch_folder(model)
            checkpoint_every = math.inf  # no stream commits: nothing will resume from it
        else:
            folder = contextlib.nullcontext(checkpoint_dir)
        with folder as checkpoint_dir:
            compress_modules(model, config, calibration=calibration, tokenizer=tokenizer, progress=progress,
                             checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    calibrate_kv(model, config, calibration=calibration, tokenizer=tokenizer)  # KV method (hf_compress/kv)
    if calibration is not None and not config.calibration.get("source"):
        config.calibration["source"] = _describe_source(calibration)
    if not config.provenance:  # for the model card: base model id, license, language when known
        from .hub import provenance_of

        config.provenance = provenance_of(model)
    attach(model, config)
    return model


def _describe_source(calibration) -> str:
    if isinstance(calibration, (str, os.PathLike)):
        return os.path.basename(str(calibration))
    if isinstance(calibration, (list, tuple)):
        return f"{len(calibration)} texts"
    info = getattr(calibration, "info", None)
    if info is not None:
        return f"datasets.Dataset {getattr(info, 'dataset_name', None) or ''}".strip()
    return type(calibration).__name__


def _is_offloaded(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters(recurse=False))


def _checked_weight(name: str, module: nn.Module, check: bool = True) -> torch.Tensor:
    """The dense [out, in] weight, read through accelerate's offload hooks when the module is offloaded.
    ``check``: refuse NaN/Inf (`compress_modules` checks every target before it changes any, so the
    replacement itself reads the weight unchecked)."""
    offloaded = _is_offloaded(module)
    with align_module_device(module):
        weight = dense_weight(module).detach()
        if weight.device.type == "meta":
            raise ConfigError(f"Weight of {name} is on the meta device and no offload hook can load it.")
        if check and weight.numel() and not torch.isfinite(torch.stack(weight.aminmax())).all():  # NaN propagates
            raise NonFiniteWeightError(f"Weight of {name} contains NaN or Inf; refusing to compress it.")
        return weight.clone() if offloaded else weight  # an offloaded weight goes back to disk on exit


def _replace(model, name, module, method, config, rank, stats=None, heldout=None) -> None:
    """Swap the dense layer ``name`` for its compressed form. ``rank``: the low-rank rank, or for a quantization
    method the EoRA rank (0: none)."""
    weight = _checked_weight(name, module, check=False)  # checked with every target in `compress_modules`
    with align_module_device(module):
        bias = None if module.bias is None else module.bias.detach().clone()
    kw = {"source": source_of(module), "dtype": weight.dtype, "device": weight.device}
    with torch.no_grad():
        if method.family == "quant":
            new = _quantized(name, weight.float(), bias, method, config, rank, stats, **kw)
        else:
            u, v = method.factorize(weight.float(), rank, stats, heldout)
            if config.bits is None:
                new = LowRankLinear.from_factors(u, v, bias, **kw)
            else:
                new = _quantized_factors(u, v, bias, config, None if stats is None else stats.merged(heldout), **kw)
    # For an offloaded layer the (smaller) compressed module is made on the hook's execution device; with a
    # checkpoint folder, once its block is written there it is read from that file (`Checkpoint.release_unit`).
    set_module(model, name, new)


def _pack(q, in_features: int, sdt, bias=None, u=None, v=None, **kw) -> QuantLinear:
    return QuantLinear.from_codes(pack(q.codes, q.bits), q.scales.to(sdt), q.zeros.to(sdt), q.bits, q.group_size,
                                  in_features, bias, u, v, **kw)


def _quantized(name, w, bias, method, config, rank, stats, **kw) -> QuantLinear:
    sdt = WEIGHT_SCALE_DTYPES[config.scale_dtype]
    q = method.quantize(w, config.bits, config.group_size, stats, sdt)
    if not rank:
        return _pack(q, w.shape[1], sdt, bias, **kw)
    error = w - q.dequantize(w.shape[1])
    u, v = eora_factors(error, rank, None if stats is None else stats.gram, name)
    fb, fg = config.eora_factor_bits, config.eora_factor_group_size
    if not fb:
        return _pack(q, w.shape[1], sdt, bias, u, v, **kw)
    layer = _pack(q, w.shape[1], sdt, bias, **kw)
    layer.set_quantized_factors(*quantized_eora_factors(u, v, fb, fg, stats, sdt), fb, fg)
    return layer


def quantized_eora_factors(u, v, bits: int, group_size: int, stats, sdt):
    """Packed (qweight, scales, zeros) of Uᵀ [r, out] and of V [r, in], both rank-major. V (which sees the layer's
    inputs) is quantized by GPTQ on their Gram when there is one, HQQ otherwise; Uᵀ by HQQ. Every quantizer here
    works row by row, so the codes of the first k rows are those of the rank-k factors (truncation commutes)."""
    have_gram = stats is not None and stats.gram is not None
    qv = get_method("gptq" if have_gram else "hqq")().quantize(v, bits, group_size, stats if have_gram else None, sdt)
    qu = get_method("hqq")().quantize(u.T.contiguous(), bits, group_size, None, sdt)
    return tuple((pack(q.codes, bits), q.scales.to(sdt), q.zeros.to(sdt)) for q in (qu, qv))


def factor_quantizer(config: CompressionConfig, have_stats: bool):
    name = config.quantizer or ("gptq" if have_stats else "hqq")
    return get_method(name)()


def _quantized_factors(u, v, bias, config, stats, **kw) -> QuantLowRankLinear:
    """Quantize V (input: the layer's x) then U (input: V̂x); a calibrated quantizer sees the Gram of each input,
    G for V and V̂·G·V̂ᵀ for U, so U also absorbs the rounding error of V."""
    sdt = WEIGHT_SCALE_DTYPES[config.scale_dtype]
    have_stats = stats is not None and stats.gram is not None
    quantizer = factor_quantizer(config, have_stats)
    qv = quantizer.quantize(v, config.bits, config.group_size, stats if have_stats else None, sdt)
    u_stats = None
    if have_stats:
        v_hat = qv.dequantize(v.shape[1]).double().to(stats.gram.device)
        u_stats = LayerStats(gram=v_hat @ stats.gram @ v_hat.T, count=stats.count)
    qu = quantizer.quantize(u, config.bits, config.group_size, u_stats, sdt)
    kw_q = {"dtype": kw["dtype"], "device": kw["device"]}
    return QuantLowRankLinear.from_parts(_pack(qv, v.shape[1], sdt, **kw_q), _pack(qu, u.shape[1], sdt, **kw_q), bias,
                                         source=kw["source"])


def uses_calibration(config: CompressionConfig, calibration_given: bool) -> bool:
    """Whether compression runs the calibrated (block-wise) pipeline."""
    method = get_method(config.method)
    if method.needs:
        return True
    if config.quantizer is not None and get_method(config.quantizer).needs:
        return True
    # optional statistics: EoRA in the inputs' eigenspace, GPTQ for low-rank factors
    return calibration_given and bool((config.eora_rank or config.eora_bits) if method.family == "quant"
                                      else config.bits)


def _plan(config, method, shapes, factor_bits: dict[str, int] | None = None) -> dict[str, int | None]:
    if method.family == "quant":
        if config.eora_bits:  # factors of a generous rank now; `allocate_eora` truncates them to the budget
            return {n: eora_rank_cap(o, i, config.eora_bits, config.eora_factor_bits or (factor_bits or {}).get(n, 16))
                    for n, (o, i) in shapes.items()}
        return {n: min(config.eora_rank or 0, o, i) for n, (o, i) in shapes.items()}
    return plan_ranks(shapes, config.ratio, config.rank, config.dense_fallback)


def eora_rank_cap(out_f: int, in_f: int, bits: float, factor_bits: int) -> int:
    """The largest EoRA rank a budgeted layer may get: 4x its equal-share rank (at least 8), at most min(out, in)."""
    equal = bits * out_f * in_f / ((out_f + in_f) * factor_bits)
    return min(out_f, in_f, max(8, math.ceil(4 * equal)))


def allocate_eora(model: nn.Module, names, bits: float) -> dict[str, int]:
    """Truncate the EoRA factors of the layers ``names`` to one global budget of ``bits`` extra bits per weight.

    Rank i of a layer removes σᵢ² of its (input-weighted) error energy; the factors come from ``truncated_factors``
    (U = Uₛ·√Σ with orthonormal Uₛ), so σᵢ = ‖U[:, i]‖². Taking ranks in decreasing σᵢ² per stored bit is the
    greedy knapsack; within a layer it takes a prefix, which is the truncated SVD at that rank."""
    layers = {n: model.get_submodule(n) for n in names}
    layers = {n: m for n, m in layers.items() if isinstance(m, QuantLinear)}
    budget = bits * sum(m.out_features * m.in_features for m in layers.values())
    items = []
    for n, m in layers.items():
        if not m.rank:
            continue
        cost = m.rank_bits
        gains = m.factors(torch.float64)[0].detach().square().sum(0).square()  # σᵢ² (of the stored factors)
        items += [(g / cost, cost, n) for g in gains.tolist()]
    items.sort(key=lambda t: -t[0])
    ranks = {n: 0 for n in layers}
    spent = 0.0
    for _, cost, n in items:
        if spent + cost <= budget:
            ranks[n] += 1
            spent += cost
    for n, m in layers.items():
        m.truncate_rank(ranks[n])
    return ranks


def _correct(module, method, stats, heldout) -> None:
    """Let the method refit a layer that stays dense (in place; same shape, no parameter cost)."""
    if _is_offloaded(module):
        logger.info("not correcting an offloaded dense layer (its weights live in the offload store)")
        return
    new = method.correct(dense_weight(module).detach().float(), stats, heldout)
    if new is not None:
        with torch.no_grad():
            dense_weight(module).copy_(new)


def compress_modules(model: nn.Module, config: CompressionConfig, *, calibration=None, tokenizer=None,
                     progress: bool = True, checkpoint_dir=None, checkpoint_every: float = 60.0) -> dict:
    """Replace the targeted modules of ``model`` by compressed ones (no bookkeeping on the model).

    Returns a small report: {"ranks": {name: rank|None}, "betas": {...}, "seconds": ...}."""
    method = get_method(config.method)(**config.method_kwargs)
    alloc = config.alloc or method.default_alloc
    if config.rank is not None or method.family == "quant":
        alloc = "uniform"
    targets = find_targets(model, config.targets, config.skip)
    for name, module in targets.items():
        _checked_weight(name, module)
    shapes = {name: shape_of(m) for name, m in targets.items()}
    t0 = time.time()
    tied_head = _tied_output_embedding(model, targets)

    factor_bits = {n: 8 * m.weight.element_size() for n, m in targets.items()}
    if not uses_calibration(config, calibration is not None):
        ckpt = checkpoint_dir and Checkpoint(checkpoint_dir, fingerprint(config, targets), checkpoint_every)
        if ckpt and ckpt.done:
            plan = ckpt.extra["plan"]
        elif alloc == "uniform":
            plan = _plan(config, method, shapes, factor_bits)
        else:
            spectra = {n: method.spectrum(_checked_weight(n, m).float()) for n, m in targets.items()}
            plan = allocate_energy(spectra, shapes, config.ratio)
        units = _units(model, targets)
        done = _restore(ckpt, model, len(units))
        for u in Progress(range(len(units)), config.method, "block", bar=progress, skipped=done):
            for name in units[u]:
                if plan[name] is not None:
                    _replace(model, name, targets[name], method, config, plan[name])
            if ckpt:
                _checkpoint_unit(ckpt, u, model, [n for n in units[u] if plan[n] is not None], targets)
                ckpt.commit(u + 1, {"plan": plan})
        report = {"ranks": plan, "seconds": time.time() - t0}
    else:
        if calibration is None:
            what = config.method if method.needs else f"{config.method} with quantizer {config.quantizer}"
            raise ConfigError(f"{what!r} needs calibration data: pass calibration=<text file, list of "
                              "strings, datasets.Dataset or token ids> (CLI: --calib FILE)")
        report = _compress_calibrated(model, config, method, alloc, targets, shapes, calibration, tokenizer, progress,
                                      t0, factor_bits, checkpoint_dir, checkpoint_every)
    if config.eora_bits:
        report["eora_ranks"] = allocate_eora(model, list(targets), config.eora_bits)
    if tied_head is not None and model.get_output_embeddings() is not tied_head:
        _untie(model)
    return report


def _tied_output_embedding(model: nn.Module, targets: dict[str, nn.Module]) -> nn.Module | None:
    """The output embedding (``lm_head``) when it is among ``targets`` and shares its weight with the input
    embedding; None otherwise."""
    get_out, get_in = (getattr(model, n, None) for n in ("get_output_embeddings", "get_input_embeddings"))
    head, emb = (get_out() if get_out else None), (get_in() if get_in else None)
    if head is None or emb is None or not any(m is head for m in targets.values()):
        return None
    return head if getattr(head, "weight", None) is getattr(emb, "weight", False) else None


def _untie(model: nn.Module) -> None:
    """A compressed head is no longer the input embedding (which stays dense, for the lookup): say so in the config,
    or transformers ties the embedding's weight back onto the compressed module at load (``tie_word_embeddings``)
    and fails. Costs the head's compressed bytes beside the embedding's."""
    config = getattr(model, "config", None)
    for c in (config, config.get_text_config() if hasattr(config, "get_text_config") else None):  # often one object
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    logger.info("the compressed lm_head was tied to the input embeddings: untied (tie_word_embeddings=False); the "
                "embedding stays dense")


def _units(model, targets: dict[str, nn.Module]) -> list[list[str]]:
    """The targets grouped by the repeated block that holds them (one unit per layer where they are not all
    inside the blocks): the granularity of progress and checkpoints."""
    try:
        prefix, blocks = find_blocks(model, targets)
    except ConfigError:
        return [[n] for n in targets]
    units: list[list[str]] = [[] for _ in blocks]
    for name in targets:
        units[_block_index(name, prefix)].append(name)
    return units


def _block_index(name: str, prefix: str) -> int:
    return int(name[len(prefix) + 1 :].split(".")[0])


def _checkpoint_unit(ckpt, unit: int, model, names: list[str], targets: dict[str, nn.Module]) -> None:
    """Write unit ``unit``'s modules ``names``; those replacing an offloaded layer are then read from that file
    (memory-mapped) instead of staying in RAM."""
    ckpt.save_unit(unit, model, names)
    ckpt.release_unit(unit, model, [n for n in names if _is_offloaded(targets[n])])


def _restore(ckpt, model, n_units: int) -> int:
    """Put the checkpointed units back into ``model``; the number of units restored."""
    if not ckpt or not ckpt.done:
        return 0
    for u in range(ckpt.done):
        ckpt.restore_unit(u, model)
    logger.warning("resuming from %s: %d/%d blocks already compressed", ckpt.folder, ckpt.done, n_units)
    return ckpt.done


def _compress_calibrated(model, config, method, alloc, targets, shapes, calibration, tokenizer, progress, t0,
                         factor_bits=None, checkpoint_dir=None, checkpoint_every=60.0):
    clock = _Phases()
    cal = config.calibration
    windows = calibration_windows(calibration, tokenizer, cal["nsamples"], cal["seqlen"], cal["seed"])
    n_tokens = windows.numel()
    widest = max(i for _, i in shapes.values())
    if n_tokens < 4 * widest:
        logger.warning("Only %d calibration tokens for layers with up to %d inputs: the input Gram matrices are "
                       "poorly conditioned; use at least %d tokens (nsamples x seqlen).", n_tokens, widest, 4 * widest)
    # only a method reading nothing but per-channel statistics (asvd), with no quantized factors or EoRA that
    # would read the Gram, skips it
    need_gram = not (method.needs <= {"absmean"} and config.bits is None and config.quantizer is None
                     and not config.eora_rank and not config.eora_bits)
    n_val = max(1, windows.shape[0] // 8) if method.needs_heldout and windows.shape[0] >= 2 else 0
    bs = cal["batch_size"]
    train, val = windows[: windows.shape[0] - n_val], windows[windows.shape[0] - n_val :]
    batches = list(train.split(bs)) + (list(val.split(bs)) if n_val else [])
    n_train_batches = len(train.split(bs))

    prefix, blocks = find_blocks(model, targets)
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    for name in targets:
        per_block[_block_index(name, prefix)][name] = targets[name]
    ckpt = checkpoint_dir and Checkpoint(checkpoint_dir, fingerprint(config, targets, windows), checkpoint_every)
    saved = ckpt.streams() if ckpt else {}
    if ckpt and ckpt.done and not saved:
        raise CheckpointError(f"{ckpt.folder} says {ckpt.done} blocks are done but has no streams.safetensors to "
                              "continue from; delete the folder to start over.")

    if "fisher" not in method.needs:
        fisher = {}
    elif saved:
        fisher = {n: saved[f"fisher.{n}"] for n in targets}
    else:
        with clock("fisher"):
            fisher = _fisher_rows(model, targets, batches[:n_train_batches], progress)

    runner = BlockwiseRunner(model, blocks, torch.cat(batches), batch_size=bs)
    was_training = model.training
    model.eval()
    with clock("capture"):
        runner.capture()

    # (2) ranks
    if saved:
        plan = ckpt.extra["plan"]
    elif alloc == "uniform":
        plan = _plan(config, method, shapes, factor_bits)
    else:
        spectra = {}
        hidden = runner.hidden[:n_train_batches]  # spectra are of the training windows: held-out ones are not run
        for i in Progress(range(len(blocks)), "measure spectra", "block", bar=progress):
            with clock("spectra: statistics and forward"):  # the block's outputs come from the same forward
                out: list[torch.Tensor] = []
                stats = _collect(runner, i, blocks[i], per_block[i], hidden, n_train_batches, fisher,
                                 need_gram=need_gram, outputs=out,
                                 output_gram={n for n in per_block[i] if method.spectrum_from_outputs(*shapes[n])})
            with clock("spectra: spectrum"):
                spectra.update(method.spectra(stats, lambda n: _checked_weight(n, targets[n]).float()))
            hidden = out
        if alloc == "loss":
            with clock("sensitivity"):
                sens = _output_sensitivity(model, targets, batches[:n_train_batches], progress)
            plan = allocate_energy(spectra, shapes, config.ratio, weights=sens, relative=False)
        else:
            plan = allocate_energy(spectra, shapes, config.ratio)

    # (3) sequential compression
    need_cross = "cross" in method.needs
    comp = list(runner.hidden)
    ref = list(runner.hidden) if need_cross else None
    betas = {}
    done = _restore(ckpt, model, len(blocks))
    if done:
        comp = [saved[f"comp.{b}"] for b in range(len(comp))]
        ref = [saved[f"ref.{b}"] for b in range(len(comp))] if need_cross else None
        betas = ckpt.extra["betas"]
        runner.inputs[:done] = [[] for _ in range(done)]
    for i in Progress(range(len(blocks)), config.method, "block", bar=progress, skipped=done):
        block, layers = blocks[i], per_block[i]
        correcting = getattr(method, "correct_dense", False)
        todo = {n: m for n, m in layers.items() if plan[n] is not None or correcting}
        if todo:
            ref_inputs, ref_out = ({}, None)
            if need_cross:
                with clock("reference forward"):
                    ref_inputs, ref_out = _reference_inputs(runner, i, copy.deepcopy(block), todo, prefix, ref)
            for group in input_groups(block, _local(todo, prefix, i), runner, i, comp[0]):
                names = [f"{prefix}.{i}.{n}" for n in group]
                with clock("statistics (partial forwards)"):
                    stats = _collect(runner, i, block, {n: model.get_submodule(n) for n in names}, comp,
                                     n_train_batches, fisher, ref_inputs=ref_inputs, heldout=True, stop_after=True,
                                     need_gram=need_gram)
                for n in names:
                    train_stats, val_stats = stats[n]
                    with clock("fit (method)"):
                        if plan[n] is not None:
                            _replace(model, n, model.get_submodule(n), method, config, plan[n], train_stats, val_stats)
                        else:
                            _correct(model.get_submodule(n), method, train_stats, val_stats)
                    if hasattr(method, "last_beta"):
                        betas[n] = method.last_beta
            ref = ref_out if need_cross else None
        elif need_cross:
            with clock("reference forward"):
                ref = runner.run(i, block, ref)
        with clock("compressed forward"):
            comp = runner.run(i, block, comp)
        runner.inputs[i] = []  # this block's captured calls are no longer needed
        if ckpt:
            _checkpoint_unit(ckpt, i, model, list(todo), targets)
            if ckpt.due() or i == len(blocks) - 1:
                streams = {f"comp.{b}": h for b, h in enumerate(comp)}
                streams.update({f"ref.{b}": h for b, h in enumerate(ref or [])})
                streams.update({f"fisher.{n}": f for n, f in fisher.items()})
                ckpt.commit(i + 1, {"plan": plan, "betas": betas}, streams)
    model.train(was_training)
    logger.info("time by phase: %s", clock)
    return {"ranks": plan, "betas": betas, "seconds": time.time() - t0, "calibration_tokens": n_tokens,
            "phases": dict(clock.seconds)}


class _Phases:
    """Wall time per phase of the calibrated engine: ``with clock("capture"): ...`` (logged at INFO)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())


def _local(layers: dict[str, nn.Module], prefix: str, i: int) -> dict[str, nn.Module]:
    cut = len(f"{prefix}.{i}.")
    return {n[cut:]: m for n, m in layers.items()}


def _reference_inputs(runner, i, dense_block, layers, prefix, ref_hidden):
    """Run the dense copy of block i on the reference stream; keep each target layer's inputs per batch."""
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = []
    for n in layers:
        sub = dense_block.get_submodule(n[len(f"{prefix}.{i}.") :])
        handles.append(sub.register_forward_pre_hook(lambda mod, args, n=n: captured[n].append(args[0].detach())))
    try:
        out = runner.run(i, dense_block, ref_hidden)
    finally:
        for h in handles:
            h.remove()
    return captured, out


def _collect(runner, i, block, layers: dict[str, nn.Module], hidden, n_train_batches, fisher, *, ref_inputs=None,
             heldout=False, stop_after=False, need_gram=True, outputs: list | None = None, output_gram=()):
    """Statistics of each layer's inputs over the batches of ``hidden`` run through ``block`` (``need_gram=False``:
    per-channel statistics only, see `LayerStats.add`; ``outputs``, without ``stop_after``: a list that receives
    the block's outputs, which the hooks leave untouched, so that the next block needs no second forward;
    ``output_gram``: names of layers whose statistics are instead the Gram of their outputs, `LayerStats.add_output`).

    Returns {name: LayerStats} or, with ``heldout``, {name: (train LayerStats, held-out LayerStats | None)}."""
    train = {n: LayerStats() for n in layers}
    val = {n: LayerStats() for n in layers}
    current = {"b": 0}
    need_cross = bool(ref_inputs)
    # Layers fed the very same input tensor (q/k/v; gate/up) share one set of statistics: the Gram is computed once.
    # ``seen`` keeps this batch's inputs alive, so an id cannot be reused by another tensor within the batch.
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    alias: dict[str, str] = {}

    def new_batch(b):
        current["b"] = b
        seen.clear()

    def make(n):
        def hook(module, args):
            b = current["b"]
            x = args[0]
            x_ref = ref_inputs[n][b] if need_cross else None
            key = (id(x), id(x_ref))
            if key in seen and seen[key][0] != n:
                first = seen[key][0]
                if alias.setdefault(n, first) != first:
                    raise RuntimeError(f"input sharing of {n} changed between calibration batches")
                return
            if n in alias:
                raise RuntimeError(f"input sharing of {n} changed between calibration batches")
            seen[key] = (n, x)
            target = train[n] if b < n_train_batches else val[n]
            target.add(x, x_ref, need_cross=need_cross, need_ref_gram=need_cross and target is val[n],
                       need_gram=need_gram)
        return hook

    def make_out(n):
        def hook(module, args, out):
            y = out[0] if isinstance(out, tuple) else out
            if getattr(module, "bias", None) is not None:
                with align_module_device(module):  # an offloaded layer's bias is back on disk after its forward
                    y = y - module.bias.detach()
            (train[n] if current["b"] < n_train_batches else val[n]).add_output(y.detach())
        return hook

    handles = [m.register_forward_hook(make_out(n)) if n in output_gram else m.register_forward_pre_hook(make(n))
               for n, m in layers.items()]
    last = list(layers.values())[-1] if stop_after else None
    try:
        result = runner.run(i, block, hidden, per_batch=new_batch, stop_after=last)
        if outputs is not None and result is not None:
            outputs.extend(result)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    for n, first in alias.items():
        train[n], val[n] = dataclasses.replace(train[first]), dataclasses.replace(val[first])
    for n in layers:
        train[n].fisher_rows = fisher.get(n)
        train[n].check_finite(n)
        if val[n].count:
            val[n].check_finite(n)
    if heldout:
        return {n: (train[n], val[n] if val[n].count else None) for n in layers}
    return train


def _output_sensitivity(model, targets: dict[str, nn.Module], batches, progress) -> dict[str, float]:
    """Mean squared gradient of the LM loss w.r.t. each target layer's output (dense model), per element."""
    sums = {n: 0.0 for n in targets}
    counts = {n: 0 for n in targets}

    def make(n):
        def fwd(module, args, out):
            def grad_hook(g):
                sums[n] += float(g.double().pow(2).sum())
                counts[n] += g.numel()
            out.register_hook(grad_hook)
        return fwd

    handles = [m.register_forward_hook(make(n)) for n, m in targets.items()]
    # Gradients flow from the embedding output on; no parameter needs (or gets) a gradient.
    handles.append(model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(True)))
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    device = device_of(model)
    try:
        for batch in tqdm(batches, desc="hf-compress sensitivity", disable=not progress, unit="batch"):
            for sample in batch.split(1):  # one window at a time bounds the memory of the backward pass
                sample = sample.to(device)
                model(input_ids=sample, labels=sample, use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {n: sums[n] / max(counts[n], 1) for n in targets}


def _fisher_rows(model, targets: dict[str, nn.Module], batches, progress) -> dict[str, torch.Tensor]:
    """Per output row of each target: Σ_j Σ_batches (∂L/∂W_ij)² of the LM loss (diagonal empirical Fisher)."""
    rows = {n: torch.zeros(shape_of(m)[0], dtype=torch.float64) for n, m in targets.items()}
    params = {n: dense_weight(m) for n, m in targets.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    device = device_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    try:
        for batch in tqdm(batches, desc="hf-compress fisher", disable=not progress, unit="batch"):
            for sample in batch.split(1):  # per-sample gradients: the Fisher is an expectation of squares
                model.zero_grad(set_to_none=True)
                sample = sample.to(device)
                model(input_ids=sample, labels=sample, use_cache=False).loss.backward()
                for n, m in targets.items():
                    g = m.weight.grad
                    g = g.T if g.shape != params[n].shape else g
                    rows[n] += g.double().pow(2).sum(1).cpu()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return rows
