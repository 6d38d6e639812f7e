"""Statistics of the target layers' inputs (Grams / GPTQ Hessians, cross terms, per-channel means) or outputs,
gathered by forward hooks while a block runs on one stream of calibration hidden states.

`StatsCollector` holds the state of one such pass explicitly (the batch being run, the inputs already seen in
it, which layers share another's input); `collect` runs a block under it. Layers fed the very same input tensor
(q/k/v; gate/up) share one set of statistics: one Gram per shared input, computed once.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import torch
from accelerate.utils import align_module_device
from torch import nn

from .calibration import BlockwiseRunner, LayerStats, device_of
from .modules.experts import calibrating_all_experts
from .targets import shape_of

logger = logging.getLogger(__name__)


class StatsCollector:
    """Hooks that accumulate `LayerStats` of ``layers`` (name -> module) over the batches of one pass.

    Batches ``0..n_train_batches-1`` go to the training statistics, the later ones to the held-out statistics of
    the layers with reference inputs (the training statistics of the others: see `_target`).
    ``ref_inputs`` ({name: [reference-stream input per batch]}): also the cross terms against the dense model's
    inputs (and, on held-out batches, their Gram). ``need_gram=False``: per-channel statistics only (see
    `LayerStats.add`). ``output_gram``: names of layers whose statistics are instead the Gram of their outputs
    (`LayerStats.add_output`)."""

    def __init__(self, layers: dict[str, nn.Module], n_train_batches: int, *, ref_inputs=None, need_gram=True,
                 output_gram=()):
        self.layers = layers
        self.n_train_batches = n_train_batches
        self.ref_inputs = ref_inputs
        self.need_cross = bool(ref_inputs)
        self.need_gram = need_gram
        self.output_gram = output_gram
        self.train = {n: LayerStats() for n in layers}
        self.val = {n: LayerStats() for n in layers}
        self.batch = 0
        # this batch's inputs by (id of input, id of reference input) -> (first layer fed it, the input): keeping
        # the tensor alive means its id cannot be reused by another tensor within the batch
        self.seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self.alias: dict[str, str] = {}  # layer -> the layer whose statistics it shares
        self.handles: list = []

    def new_batch(self, b: int) -> None:
        self.batch = b
        self.seen.clear()

    def _target(self, n: str) -> LayerStats:
        # held-out batches are kept apart only for layers with cross terms (what a held-out error measures, e.g.
        # SVD-LLM's compensation strength); a layer without them (an expert: the two streams route different tokens)
        # would only have its held-out statistics merged back into its training ones, so they go there directly —
        # one Gram per expert rather than two
        if self.batch < self.n_train_batches or not (self.need_cross and n in self.ref_inputs):
            return self.train[n]
        return self.val[n]

    def on_input(self, n: str, module: nn.Module, args) -> None:
        b = self.batch
        x = args[0]
        # layers without reference inputs (experts: the two streams route different tokens) get no cross terms
        x_ref = self.ref_inputs[n][b] if self.need_cross and n in self.ref_inputs else None
        key = (id(x), id(x_ref))
        if key in self.seen and self.seen[key][0] != n:
            first = self.seen[key][0]
            if self.alias.setdefault(n, first) != first:
                raise RuntimeError(f"input sharing of {n} changed between calibration batches")
            return
        if n in self.alias:
            raise RuntimeError(f"input sharing of {n} changed between calibration batches")
        self.seen[key] = (n, x)
        target = self._target(n)
        cross = x_ref is not None
        target.add(x, x_ref, need_cross=cross, need_ref_gram=cross and target is self.val[n], need_gram=self.need_gram)

    def on_output(self, n: str, module: nn.Module, args, out) -> None:
        y = out[0] if isinstance(out, tuple) else out
        if getattr(module, "bias", None) is not None:
            with align_module_device(module):  # an offloaded layer's bias is back on disk after its forward
                y = y - module.bias.detach()
        self._target(n).add_output(y.detach())

    def attach(self) -> None:
        self.handles = [m.register_forward_hook(partial(self.on_output, n)) if n in self.output_gram
                        else m.register_forward_pre_hook(partial(self.on_input, n)) for n, m in self.layers.items()]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.seen.clear()

    def finish(self, fisher: dict[str, torch.Tensor], heldout: bool = False):
        """The statistics, checked finite: {name: LayerStats} or, with ``heldout``, {name: (train LayerStats,
        held-out LayerStats | None)}. ``fisher``: per-row Fisher weights of the layers that have them."""
        train, val = self.train, self.val
        for n, first in self.alias.items():
            train[n], val[n] = dataclasses.replace(train[first]), dataclasses.replace(val[first])
        unseen = [n for n in self.layers if train[n].count == 0]
        for n in unseen:  # an expert the router sent no calibration token to
            train[n] = white_stats(*shape_of(self.layers[n]), need_gram=self.need_gram)
        if unseen:
            logger.warning("%d layer(s) received no calibration token (%s%s): fitted on white inputs (Gram = I), i.e. "
                           "as the method does without data", len(unseen), ", ".join(unseen[:3]),
                           ", ..." if len(unseen) > 3 else "")
        for n in self.layers:
            if n not in unseen:
                train[n].fisher_rows = fisher.get(n)
            train[n].check_finite(n)
            if val[n].count:
                val[n].check_finite(n)
        if heldout:
            return {n: (train[n], val[n] if val[n].count else None) for n in self.layers}
        return train


def white_stats(out_features: int, in_features: int, need_gram: bool = True) -> LayerStats:
    """The statistics of one white input (Gram I, per-channel mean 1, Fisher rows 1): what a layer that saw no
    calibration token is fitted on, so that each method does what it does without data (GPTQ: round to nearest;
    SVD-LLM, ASVD, FWSVD: plain SVD)."""
    kw = {"dtype": torch.float64}
    return LayerStats(gram=torch.eye(in_features, **kw) if need_gram else None, abssum=torch.ones(in_features, **kw),
                      count=1, fisher_rows=torch.ones(out_features, **kw))


def collect(runner: BlockwiseRunner, i: int, block: nn.Module, layers: dict[str, nn.Module], hidden,
            n_train_batches: int, fisher, *, ref_inputs=None, heldout=False, stop_after=False, need_gram=True,
            outputs: list | None = None, output_gram=(), all_experts: bool = False):
    """Statistics of each layer's inputs over the batches of ``hidden`` run through ``block`` (`StatsCollector`
    for the options; ``stop_after``: stop each forward after the last of ``layers``; ``outputs``, without
    ``stop_after``: a list that receives the block's outputs, which the hooks leave untouched, so that the next
    block needs no second forward).

    ``all_experts``: the block's experts each run on every token (`calibrating_all_experts`), so that each expert's
    statistics cover all tokens; otherwise an expert's are of the tokens routed to it.

    Returns {name: LayerStats} or, with ``heldout``, {name: (train LayerStats, held-out LayerStats | None)}."""
    collector = StatsCollector(layers, n_train_batches, ref_inputs=ref_inputs, need_gram=need_gram,
                               output_gram=output_gram)
    collector.attach()
    last = list(layers.values())[-1] if stop_after else None
    try:
        with calibrating_all_experts(block, all_experts):
            result = runner.run(i, block, hidden, per_batch=collector.new_batch, stop_after=last)
        if outputs is not None and result is not None:
            outputs.extend(result)
    finally:
        collector.detach()
    return collector.finish(fisher, heldout)


def reference_inputs(runner: BlockwiseRunner, i: int, dense_block: nn.Module, layers, local_names: dict[str, str],
                     ref_hidden):
    """Run the dense block i (not yet fitted) on the reference stream; keep each target layer's inputs per batch.
    ``local_names``: each layer's name inside the block. Returns ({name: [input per batch]}, the block's outputs)."""
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = []
    for n in layers:
        sub = dense_block.get_submodule(local_names[n])
        handles.append(sub.register_forward_pre_hook(lambda mod, args, n=n: captured[n].append(args[0].detach())))
    try:
        out = runner.run(i, dense_block, ref_hidden)
    finally:
        for h in handles:
            h.remove()
    return captured, out


def _forward_with(model: nn.Module, handles: list, batches) -> None:
    """One no-grad forward of ``model`` over the calibration batches (token windows, or one input dict each:
    image+text calibration) with the hooks ``handles`` registered, which are removed afterwards whatever happens."""
    try:
        with torch.no_grad():
            for batch in batches:
                device = device_of(model)
                inputs = ({k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict)
                          else {"input_ids": batch.to(device)})
                model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def expert_usage(model: nn.Module, targets, batches) -> dict[str, float]:
    """The share of each expert's routed tokens in its block, for every target that is an expert's layer
    (``{experts}.{weight}.{e}``), from one forward of ``model`` over ``batches`` (the router's top-k choices)."""
    from .modules.experts import CompressedExperts

    counts: dict[str, torch.Tensor] = {}

    def hook(name):
        def count(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hits = torch.bincount(index.reshape(-1).cpu(), minlength=module.num_experts + 1)[: module.num_experts]
            counts[name] = counts.get(name, 0) + hits.double()
        return count

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()
               if isinstance(m, CompressedExperts)]
    _forward_with(model, handles, batches)
    usage = {}
    for name in targets:
        module_name, _, index = name.rpartition(".")
        experts = module_name.rpartition(".")[0]
        if experts in counts and index.isdigit():
            total = counts[experts].sum()
            usage[name] = float(counts[experts][int(index)] / total) if total > 0 else 0.0
    return usage


def expert_errors(model: nn.Module, targets, batches, widths, group_size: int, max_tokens: int = 256
                  ) -> dict[str, dict[int, float]]:
    """Per expert layer among ``targets`` and per bit width in ``widths``: the output error of its block when that
    layer alone is rounded to the width (RTN, ``group_size``), relative to the block's output, from one forward of
    ``model`` over ``batches``.

    For expert e of a block and its tokens t (the router's choice, routing weight w_t): Σ_t w_t² ‖f_e^b(x_t) −
    f_e(x_t)‖² over Σ_t ‖y_t‖² (y: the experts module's output), summed over the batches; f_e^b is expert e with the
    layer's weight rounded to b bits. It weighs each expert by its use (how many tokens, with what routing weight)
    and by how much rounding that expert's weights costs on the inputs it really gets (a layer with outliers, or
    with inputs that amplify its error, loses more). At most ``max_tokens`` routed tokens per expert and batch are
    run (an even subsample). An expert no token reaches has error 0 at every width."""
    from .methods.rtn import RTN
    from .modules.experts import CompressedExperts

    errors: dict[str, dict[int, float]] = {}
    energy: dict[str, float] = {}
    rtn = RTN()
    wanted = set(targets)

    def linear(layer, x, weight=None):
        with align_module_device(layer):
            return nn.functional.linear(x, layer.weight if weight is None else weight.to(x.dtype), layer.bias)

    def expert(m, e, x, swap=None):
        def run(name, h):
            layer = getattr(m, name)[e]
            return linear(layer, h, swap[1] if swap and swap[0] == name else None)
        h = m._apply_gate(run("gate_up_proj", x)) if m.has_gate else m.act_fn(run("up_proj", x))
        y = run("down_proj", h)
        return m.post_expert_norm(y) if m.has_post_expert_norm else y

    def hook(module_name):
        def measure(m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            energy[module_name] = energy.get(module_name, 0.0) + float(out.double().pow(2).sum())
            for e in range(m.num_experts):
                names = [f"{module_name}.{w}.{e}" for w in m.weight_names if f"{module_name}.{w}.{e}" in wanted]
                tok, pos = torch.where(index == e)
                for n in names:
                    errors.setdefault(n, {b: 0.0 for b in widths})
                if not names or tok.numel() == 0:
                    continue
                if tok.numel() > max_tokens:
                    keep = torch.linspace(0, tok.numel() - 1, max_tokens, device=tok.device).round().long()
                    tok, pos = tok[keep], pos[keep]
                    scale = index.eq(e).sum().item() / max_tokens  # the subsample stands for all routed tokens
                else:
                    scale = 1.0
                xs, w2 = x[tok], weights[tok, pos].double().pow(2)
                ref = expert(m, e, xs).double()
                for n in names:
                    wname = n.split(".")[-2]
                    layer = getattr(m, wname)[e]
                    with align_module_device(layer):
                        dense_w = layer.weight.detach()
                    for b in widths:
                        q = rtn.quantize(dense_w.float(), b, group_size, scale_dtype=torch.float16)
                        y = expert(m, e, xs, (wname, q.dequantize(dense_w.shape[1]))).double()
                        errors[n][b] += scale * float(((y - ref).pow(2).sum(-1) * w2).sum())
        return measure

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()
               if isinstance(m, CompressedExperts)]
    _forward_with(model, handles, batches)
    for n, per in errors.items():
        total = energy.get(n.rsplit(".", 2)[0], 0.0)
        for b in per:
            per[b] = per[b] / total if total > 0 else 0.0
    return errors
