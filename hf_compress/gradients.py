"""Gradient passes of the LM loss on the calibration windows, through the whole (dense) model:

* `output_sensitivity`: mean squared gradient at each target's output (the ``loss`` allocator's weights);
* `fisher_rows`: per output row, the diagonal empirical Fisher of each target's weight (FWSVD's row weights).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import device_of
from .targets import dense_weight, shape_of


def output_sensitivity(model, targets: dict[str, nn.Module], batches, progress) -> dict[str, float]:
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


def fisher_rows(model, targets: dict[str, nn.Module], batches, progress) -> dict[str, torch.Tensor]:
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
                    if g is None:  # an expert the router sent none of this window's tokens to
                        continue
                    g = g.T if g.shape != params[n].shape else g
                    rows[n] += g.double().pow(2).sum(1).cpu()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return rows
