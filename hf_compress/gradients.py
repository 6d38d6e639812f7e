"""Gradient passes of a loss on the calibration windows, through the whole (dense) model:

* `output_sensitivity`: mean squared gradient at each target's output (the ``loss`` allocator's weights);
* `fisher_rows`: per output row, the diagonal empirical Fisher of each target's weight (FWSVD's row weights).

Which loss (`objective`):

* a model whose ``forward`` takes ``labels`` (a causal LM, a vision-language model, a masked-LM head) is scored by
  its own loss with the window as labels: the LM loss for a causal LM; for a masked-LM head (``BertForMaskedLM``),
  the loss of predicting every input token from the unmasked window;
* a model without one (an encoder such as ``BertModel``: no head, no ``.loss``) is scored by the reconstruction
  error of its output, ½‖h − h_dense‖² of the last hidden state h. That error's gradient is zero at the dense model
  itself, so its squared gradients are replaced by their Gauss-Newton expectation: the gradient of ⟨h, r⟩ for r a
  standard normal tensor drawn per window (seeded by the window's index), whose squared gradients average to the
  diagonal of JᵀJ — the curvature of the reconstruction error (J: the Jacobian of h with respect to the layer's
  output, or weight).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import device_of
from .targets import dense_weight, shape_of


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(type(model).forward).parameters


def _inputs(model, sample: dict) -> dict:
    """A window's model inputs, without a KV cache where the model takes ``use_cache``."""
    inputs = dict(sample)
    if _accepts(model, "use_cache"):
        inputs["use_cache"] = False
    return inputs


def _last_hidden(out) -> torch.Tensor:
    """The last hidden state of a model output (a ``ModelOutput``, a tuple, or the tensor itself)."""
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
    return hidden


def samples_of(batch, device) -> list[dict[str, torch.Tensor]]:
    """One window at a time: the rows of a [n, seqlen] batch, or an input dict (image+text calibration) as it is."""
    if isinstance(batch, dict):
        return [{k: v.to(device) for k, v in batch.items()}]
    return [{"input_ids": sample.to(device)} for sample in batch.split(1)]


def objective(model, sample, index: int) -> torch.Tensor:
    """The scalar whose gradients the passes square, for window ``sample`` ([1, seqlen] token ids, or a dict of
    model inputs), the ``index``-th (module docstring): the model's own loss with the window's tokens as labels where
    its forward takes ``labels``; otherwise ⟨h, r⟩ of the last hidden state h and a standard normal r seeded by
    ``index`` (the Gauss-Newton form of the output-reconstruction error)."""
    inputs = _inputs(model, sample if isinstance(sample, dict) else {"input_ids": sample})
    if _accepts(model, "labels"):
        out = model(**inputs, labels=inputs["input_ids"])
        if getattr(out, "loss", None) is not None:
            return out.loss
    else:
        out = model(**inputs)
    hidden = _last_hidden(out)
    r = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(index), dtype=torch.float32)
    return (hidden.float() * r.to(hidden.device)).sum()


def output_sensitivity(model, targets: dict[str, nn.Module], batches, progress) -> dict[str, float]:
    """Mean squared gradient of the `objective` w.r.t. each target layer's output (dense model), per element."""
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
        index = 0
        for batch in tqdm(batches, desc="hf-compress sensitivity", disable=not progress, unit="batch"):
            for sample in samples_of(batch, device):  # one window at a time bounds the memory of the backward pass
                objective(model, sample, index).backward()
                index += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {n: sums[n] / max(counts[n], 1) for n in targets}


def fisher_rows(model, targets: dict[str, nn.Module], batches, progress) -> dict[str, torch.Tensor]:
    """Per output row of each target: Σ_j Σ_batches (∂L/∂W_ij)² of the `objective` (diagonal empirical Fisher)."""
    rows = {n: torch.zeros(shape_of(m)[0], dtype=torch.float64) for n, m in targets.items()}
    params = {n: dense_weight(m) for n, m in targets.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    device = device_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    try:
        index = 0
        for batch in tqdm(batches, desc="hf-compress fisher", disable=not progress, unit="batch"):
            for sample in samples_of(batch, device):  # per-sample gradients: the Fisher is an expectation of squares
                model.zero_grad(set_to_none=True)
                objective(model, sample, index).backward()
                index += 1
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


def model_output(model, sample) -> tuple[torch.Tensor, bool]:
    """What `output_divergence` compares, for one window ``sample`` (a dict of model inputs): (its logits, True)
    where the model returns ``logits``; otherwise (its last hidden state, False)."""
    with torch.no_grad():
        out = model(**_inputs(model, sample))
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits.detach(), True
    return _last_hidden(out).detach(), False


def output_divergence(model, samples, reference: list[tuple[torch.Tensor, bool]], chunk: int = 128) -> float:
    """How far the model's outputs on ``samples`` moved from ``reference`` (`model_output` of each, taken before):
    the mean KL(reference ‖ now) of the next-token distributions per position where the model has logits, else
    half the mean squared difference of the last hidden states per element. In float64, ``chunk`` positions at a
    time (a small KL is a difference of nearly equal log-probabilities)."""
    total, count = 0.0, 0
    for sample, (ref, logits) in zip(samples, reference):
        now, _ = model_output(model, sample)
        ref, now = ref.reshape(-1, ref.shape[-1]), now.reshape(-1, now.shape[-1])
        for a, b in zip(ref.split(chunk), now.split(chunk)):
            a, b = a.double(), b.double()
            if logits:
                a, b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
                total += float((a.exp() * (a - b)).sum())
                count += a.shape[0]
            else:
                total += 0.5 * float((b - a).pow(2).sum())
                count += a.numel()
    return total / max(count, 1)
