"""Pipelines: how the data moves while the targets of a model are replaced.

* `datafree`: each target from its weight alone;
* `sequential`: block by block on calibration data (statistics, gradient passes, per-group fits).

`compress_modules` applies the config's transform (``rotate``: `hf_compress.transforms`) to the dense model, finds the
targets, checks them, picks the pipeline (`uses_calibration`), runs it, then spends the EoRA budget and unties a
compressed tied ``lm_head``. What a method computes is in `hf_compress.methods`, how
a compressed module is built in `hf_compress.factory`, the budgets in `hf_compress.allocation`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..allocation import allocate_eora, allocator_for
from ..errors import ConfigError
from ..methods import get_method
from ..modules.experts import WEIGHT_NAMES, split_experts, unsplit_untouched
from ..targets import language_model, other_modalities, targets_of, tied_output_embedding, untie
from ..transforms import rotate_residual
from . import datafree, sequential
from .common import Job

logger = logging.getLogger(__name__)


def uses_calibration(config, calibration_given: bool) -> bool:
    """Whether compression runs the calibrated (block-wise) pipeline."""
    method = get_method(config.method)(**config.method_kwargs)  # an option may ask for statistics (grid="mse-act")
    if method.needs:
        return True
    if config.quantizer is not None and get_method(config.quantizer).needs:
        return True
    if config.expert_bits or getattr(config, "avg_bits", None):  # allocated from routing / error statistics
        return True
    if getattr(config, "learn_rounding", None) or getattr(config, "channel_scales", None):  # from calibration windows
        return True
    # optional statistics: EoRA in the inputs' eigenspace, GPTQ for low-rank factors
    return calibration_given and bool((config.eora_rank or config.eora_bits) if method.family == "quant"
                                      else config.bits)


def compress_modules(model: nn.Module, config, *, calibration=None, tokenizer=None, progress: bool = True,
                     checkpoint_dir=None, checkpoint_every: float = 60.0) -> dict:
    """Replace the targeted modules of ``model`` by compressed ones (no bookkeeping on the model).

    Returns a small report: {"ranks": {name: rank|None}, "betas": {...}, "seconds": ...}."""
    method = get_method(config.method)(**config.method_kwargs)
    alloc = allocator_for(config, method)
    if config.expert_prune:  # before anything else: the methods see the pruned model
        _prune(model, config, calibration, tokenizer)
    widths = {}
    if config.expert_bits and config.expert_bits_by == "importance":  # likewise: it may remove experts
        widths = _allocate_experts(model, config, calibration, tokenizer)
    split_experts(model)  # fused experts -> one dense layer per expert (`hf_compress.modules.experts`)
    try:
        report = _run(model, config, method, alloc, calibration, tokenizer, progress, checkpoint_dir,
                      checkpoint_every, widths)
    finally:  # experts nothing was done to (skipped, refused, or an error) get their fused module back
        unsplit_untouched(model)
    return report


def _removal_batches(config, calibration, tokenizer, what: str) -> list:
    """The calibration batches that ``expert_prune`` / ``expert_bits`` with removal measure the experts on (the
    run's windows, in its batch size); refuses a call without calibration data, naming ``what``."""
    from ..calibration import calibration_windows

    if calibration is None:
        raise ConfigError(f"{what} needs calibration data: pass calibration=<text file, list of strings, "
                          "datasets.Dataset or token ids> (CLI: --calib FILE)")
    cal = config.calibration
    windows = calibration_windows(calibration, tokenizer, cal["nsamples"], cal["seqlen"], cal["seed"])
    return list(windows.split(cal["batch_size"]))


def _record_removal(config, done: dict, **extra) -> None:
    """What `remove_experts` removed, into ``config.pruned_experts`` (stored with the checkpoint, shown by the
    coverage report)."""
    config.pruned_experts = {"experts": list(done["experts"]), "parameters": done["parameters"],
                             "dropped": done["dropped"], **extra}


def _prune(model, config, calibration, tokenizer) -> None:
    """``expert_prune``: remove each block's least important experts on the calibration windows (`_record_removal`)."""
    from ..transforms.expert_pruning import prune_experts

    done = prune_experts(model, config.expert_prune, _removal_batches(config, calibration, tokenizer, "expert_prune"))
    _record_removal(config, done)


def _allocate_experts(model, config, calibration, tokenizer) -> dict[str, int]:
    """``expert_bits`` by ``"importance"`` (width 0 allowed): on the dense model, each expert's cost of removal and of
    each width (`expert_costs`), one global allocation under the budget ``bits`` per original expert weight
    (`allocate_expert_bits`: every block removes the same number, at least top-k kept), then the removal
    (`remove_experts`, as ``expert_prune``). Records what was removed and the widths in ``config.pruned_experts``;
    returns the width of every kept expert's layer, by its name once the experts are split."""
    from ..allocation import allocate_expert_bits
    from ..transforms.expert_pruning import expert_costs, prunable, remove_experts

    what = f"expert_bits {config.expert_bits} by importance"
    batches = _removal_batches(config, calibration, tokenizer, what)
    blocks, n, top_k = prunable(model, what)
    costs = expert_costs(model, batches, [b for b in config.expert_bits if b > 0], config.group_size)
    units, sizes, errors, layers = {}, {}, {}, {}
    for name, (block, child, _) in blocks.items():
        experts = getattr(block, child)
        layers[name] = [k for k in WEIGHT_NAMES if isinstance(getattr(experts, k, None), torch.Tensor)]
        per_expert = sum(getattr(experts, k)[0].numel() for k in layers[name])
        units[name] = [f"{name}.{child}.{e}" for e in range(n)]
        for e, u in enumerate(units[name]):
            sizes[u], errors[u] = per_expert, costs[name][e]
    chosen = allocate_expert_bits({u: 1.0 for u in sizes}, sizes, config.expert_bits, config.bits, errors,
                                  blocks=units, keep=top_k)
    dropped = {name: [e for e, u in enumerate(us) if chosen[u] == 0] for name, us in units.items()}
    done = remove_experts(model, dropped)
    layer_bits = {}
    for name, (_, child, _) in blocks.items():
        kept = [u for u in units[name] if chosen[u] > 0]
        for j, u in enumerate(kept):  # the kept experts are renumbered 0..E'-1
            layer_bits.update({f"{name}.{child}.{k}.{j}": chosen[u] for k in layers[name]})
    count = {str(b): sum(1 for u in chosen if chosen[u] == b) for b in sorted(set(chosen.values()))}
    spent = sum(sizes[u] * chosen[u] for u in chosen) / sum(sizes.values())
    _record_removal(config, done, widths=count)
    logger.warning("%s (budget %g bits per original expert weight): removed %d of %d experts in each of %d blocks "
                   "(%s parameters, the least important by routing weight x output norm); %s; %.4f bits per "
                   "original expert weight (codes)", what, config.bits, n - done["experts"][1], n, len(blocks),
                   f"{done['parameters']:,}", ", ".join(f"{k} experts at {b} bits" for b, k in count.items()
                                                        if b != "0") or "no expert kept", spent)
    return layer_bits


def _run(model, config, method, alloc, calibration, tokenizer, progress, checkpoint_dir, checkpoint_every,
         expert_widths=None) -> dict:
    vision = getattr(config, "vision", False)
    targets = targets_of(model, config.targets, config.skip, vision)
    calibrated = uses_calibration(config, calibration is not None)
    _report_modalities(model, targets, vision, calibrated)
    for target in targets.values():  # NaN/Inf anywhere refuses the run before any layer changes
        target.weight()
    if calibrated and calibration is None:
        what = (config.method if method.needs else f"{config.method} with expert_bits" if config.expert_bits
                else f"{config.method} with learn_rounding" if getattr(config, "learn_rounding", None)
                else f"{config.method} with channel_scales" if getattr(config, "channel_scales", None)
                else f"{config.method} with avg_bits" if getattr(config, "avg_bits", None)
                else f"{config.method} with quantizer {config.quantizer}")
        raise ConfigError(f"{what!r} needs calibration data: pass calibration=<text file, list of "
                          "strings, datasets.Dataset or token ids> (CLI: --calib FILE)")
    # the transform comes after every check that can refuse the run, and before any weight method
    rotation = rotate_residual(model, config.rotate, config.rotate_seed, config.rotate_heads) if config.rotate else {}
    job = Job(model, config, method, alloc, targets, progress, checkpoint_dir, checkpoint_every)
    job.bits = {n: b for n, b in (expert_widths or {}).items() if n in targets}
    tied_head = tied_output_embedding(model, job.modules.values())
    report = sequential.run(job, calibration, tokenizer) if calibrated else datafree.run(job)
    report.update(rotation)
    if config.eora_bits:
        report["eora_ranks"] = allocate_eora(model, list(targets), config.eora_bits)
    if tied_head is not None and model.get_output_embeddings() is not tied_head:
        untie(model)
    return report


def _report_modalities(model, targets: dict, vision: bool, calibrated: bool) -> None:
    """Multimodal models: say which parts outside the language model are compressed and which stay dense; refuse
    a calibrated run over them (the calibrated pipeline runs one list of blocks on text)."""
    language = language_model(model)
    if not language:
        return
    parts = other_modalities(model, language)
    touched = {p: [n for n in names if n in targets] for p, names in parts.items()}
    if calibrated and any(touched.values()):
        hit = [p for p, names in touched.items() if names]
        raise ConfigError(f"calibrated methods compress one list of blocks, the language model's ({language}), on "
                          f"text or image+text calibration; {hit} lie outside it: compress them with a data-free "
                          "method (rtn, hqq, svd) or leave vision=False / name language-model layers in targets")
    left = {p: len(names) - len(touched[p]) for p, names in parts.items() if len(names) > len(touched[p])}
    done = {p: len(names) for p, names in touched.items() if names}
    logger.warning("%s is multimodal: compressing its language model (%s)%s%s", type(model).__name__, language,
                   "; also compressed: " + ", ".join(f"{p} ({n} linear layers)" for p, n in done.items())
                   if done else "",
                   "; left dense: " + ", ".join(f"{p} ({n} linear layers)" for p, n in left.items())
                   + (" (compress them too with vision=True or targets)" if not vision else "") if left else "")


__all__ = ["compress_modules", "uses_calibration"]
