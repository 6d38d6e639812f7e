"""The calibrated pipeline, block by block (`hf_compress.calibration.BlockwiseRunner`):

1. capture every block's inputs for the calibration windows (one forward of the model, block 0 alone computed);
2. when ranks are allocated from measurements: one pass over the blocks on the dense stream, collecting each
   layer's statistics (`hf_compress.statistics`), keeping only its spectrum, then `allocate_energy` under the
   global budget (weighted by `hf_compress.gradients.output_sensitivity` for the ``loss`` allocator);
   with ``avg_bits``, likewise one pass collecting each layer's input Gram, keeping only its estimated loss
   increase in each allowed format, then `allocate_layer_formats` under the budget of stored bits (`_layer_bits`);
3. the compression pass, block i at a time: inside the block, layers that share an input (q/k/v; o; gate/up;
   down) are fitted group by group on the inputs the *compressed* model really produces (blocks 0..i-1 and the
   block's earlier groups already compressed) against the dense model's inputs where the method compensates;
   then the compressed block produces block i+1's inputs. One block and the calibration activations are what
   is held at any time. With a checkpoint folder, each finished block is written there and the streams are
   committed (`hf_compress.resume`), so that a resumed run continues bit for bit;
4. with ``learn_rounding`` (`hf_compress.pipelines.reconstruct`), once block i's layers are quantized their rounding
   and clipping are learned against the dense block's outputs on the dense stream (carried along as the reference
   stream), before the block produces block i+1's inputs.

The blocks are one `Stack`: the list of repeated blocks that holds the targets, and the targets inside each.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..allocation import (allocate_energy, allocate_expert_bits, allocate_layer_formats, layer_groups,
                          plan as uniform_plan, stored_bits)
from ..calibration import (BlockwiseRunner, calibration_windows, device_of, input_groups, is_multimodal_source,
                           multimodal_inputs)
from ..errors import CheckpointError, ConfigError
from ..factory import correct, pack_layer, replace
from ..methods.quantlib import rounding_error
from ..gradients import fisher_rows, model_output, output_divergence, output_sensitivity, samples_of
from ..modules.experts import is_expert_layer
from ..modules.quant import WEIGHT_SCALE_DTYPES
from ..progress import Progress
from ..statistics import collect, expert_errors, expert_usage, reference_inputs
from ..targets import block_index, dense_weight, find_blocks, is_offloaded, set_module
from ..transforms import channel_scales
from . import reconstruct
from .common import Job, Phases, checkpoint_unit, restore

logger = logging.getLogger(__name__)


@dataclass
class Windows:
    """The calibration windows and their batches: the training batches first, then the held-out ones. Image+text
    calibration (`hf_compress.calibration.multimodal_inputs`): each batch is one sample's input dict, and
    ``windows`` the token ids of all of them end to end (what the checkpoint fingerprint digests)."""

    windows: torch.Tensor
    batches: list
    n_train_batches: int
    batch_size: int

    @classmethod
    def of(cls, job: Job, calibration, tokenizer) -> "Windows":
        cal = job.config.calibration
        if is_multimodal_source(calibration):
            inputs = multimodal_inputs(calibration, tokenizer, cal["nsamples"])
            n_val = max(1, len(inputs) // 8) if job.method.needs_heldout and len(inputs) >= 2 else 0
            windows = torch.cat([d["input_ids"].reshape(-1) for d in inputs])[None]
            return cls(windows, inputs, len(inputs) - n_val, 1)
        windows = calibration_windows(calibration, tokenizer, cal["nsamples"], cal["seqlen"], cal["seed"])
        n_tokens = windows.numel()
        widest = max(i for _, i in job.shapes.values())
        if n_tokens < 4 * widest:
            logger.warning("Only %d calibration tokens for layers with up to %d inputs: the input Gram matrices are "
                           "poorly conditioned; use at least %d tokens (nsamples x seqlen).", n_tokens, widest,
                           4 * widest)
        n_val = max(1, windows.shape[0] // 8) if job.method.needs_heldout and windows.shape[0] >= 2 else 0
        bs = cal["batch_size"]
        train, val = windows[: windows.shape[0] - n_val], windows[windows.shape[0] - n_val :]
        batches = list(train.split(bs)) + (list(val.split(bs)) if n_val else [])
        return cls(windows, batches, len(train.split(bs)), bs)

    @property
    def train_batches(self) -> list[torch.Tensor]:
        return self.batches[: self.n_train_batches]


@dataclass
class Stack:
    """A list of repeated blocks (``prefix``: its name) and, per block, the targets inside it."""

    prefix: str
    blocks: nn.ModuleList
    layers: list[dict[str, nn.Module]]

    @classmethod
    def of(cls, model: nn.Module, modules: dict[str, nn.Module]) -> "Stack":
        prefix, blocks = find_blocks(model, modules)
        layers: list[dict[str, nn.Module]] = [{} for _ in blocks]
        for name in modules:
            layers[block_index(name, prefix)][name] = modules[name]
        return cls(prefix, blocks, layers)

    def local(self, i: int, name: str) -> str:
        """``name``'s name inside block i."""
        return name[len(f"{self.prefix}.{i}.") :]

    def full(self, i: int, local: str) -> str:
        return f"{self.prefix}.{i}.{local}"


def needs_gram(config, method) -> bool:
    """Whether the statistics include the input Gram: only a method reading nothing but per-channel statistics
    (asvd), with no quantized factors or EoRA that would read the Gram, skips it."""
    return not (method.needs <= {"absmean"} and config.bits is None and config.quantizer is None
                and not config.eora_rank and not config.eora_bits)


#: ``avg_bits`` with measured sensitivity: how many calibration windows the measurement runs the model on
PROBE = 2


class Sequential:
    """One run of the calibrated pipeline over ``job``'s targets (`run`)."""

    #: ``avg_bits``: rescale each layer's rounding errors to its method's own error (`layer_errors`)
    method_error = True

    def __init__(self, job: Job, calibration, tokenizer):
        self.job = job
        self.clock = Phases()
        self.data = Windows.of(job, calibration, tokenizer)
        self.need_gram = needs_gram(job.config, job.method)
        self.need_cross = "cross" in job.method.needs
        self.learn = job.config.learn_rounding if job.method.family == "quant" else None
        self.scaling = job.config.channel_scales if job.method.family == "quant" else None
        #: channel scales: per block, what each mapping chose (or why it was left out); the parameters outside the
        #: targets they changed (norm weights), by full name, which a resumed run restores
        self.scaled: dict[str, dict] = {}
        self.folded: dict[str, torch.Tensor] = {}
        #: the dense model's stream is carried along: for the cross terms, or as learned rounding's targets
        self.need_ref = self.need_cross or bool(self.learn)
        # (needed, why, what else to do): options that change the model's weights in memory refuse offloaded layers
        in_memory = [(bool(self.learn), "learn_rounding trains each block in memory", ""),
                     (bool(job.config.avg_bits) and job.config.bits_sensitivity == "measured",
                      "bits_sensitivity='measured' swaps each unit's quantized weights into the model in memory",
                      " or use bits_sensitivity='gradient'"),
                     (bool(self.scaling), f"channel_scales={self.scaling!r} folds scales into each block's weights in "
                      "memory", "")]
        needed = [(why, other) for need, why, other in in_memory if need]
        if needed:
            offloaded = [n for n, t in job.targets.items() if is_offloaded(t.module)]
            if offloaded:
                why, other = needed[0]
                raise ConfigError(f"{why}: {len(offloaded)} targeted layers are offloaded (e.g. {offloaded[0]}); load "
                                  f"the model without offloading{other}")
        self.learned: dict[str, dict] = {}  # block index (str, as in the checkpoint's JSON) -> reconstruct.Fitted
        self.all_experts = job.config.calibration.get("experts") == "all"
        self.stack = Stack.of(job.model, job.modules)
        self.ckpt = job.checkpoint(self.data.windows)
        self.saved = self.ckpt.streams() if self.ckpt else {}
        if self.ckpt and self.ckpt.done and not self.saved:
            raise CheckpointError(f"{self.ckpt.folder} says {self.ckpt.done} blocks are done but has no "
                                  "streams.safetensors to continue from; delete the folder to start over.")
        self.fisher: dict[str, torch.Tensor] = {}
        self.runner: BlockwiseRunner | None = None

    def run(self) -> dict:
        """Returns {"ranks": {name: rank|None}, "betas": {name: the method's choice}, "seconds", "calibration_tokens",
        "phases"}."""
        job, clock, model = self.job, self.clock, self.job.model
        self.fisher = self._fisher()
        batches = self.data.batches
        self.runner = BlockwiseRunner(model, self.stack.blocks,
                                      torch.cat(batches) if isinstance(batches[0], torch.Tensor) else batches,
                                      batch_size=self.data.batch_size)
        was_training = model.training
        model.eval()
        with clock("capture"):
            self.runner.capture()
        plan = self._plan()
        job.bits = self._layer_bits() if job.config.avg_bits else self._expert_bits()
        betas = self._compress(plan)
        model.train(was_training)
        logger.info("time by phase: %s", clock)
        report = {"ranks": plan, "betas": betas, "seconds": time.time() - job.started,
                  "calibration_tokens": self.data.windows.numel(), "phases": dict(clock.seconds)}
        if self.scaling:
            report["channel_scales"] = self._scales_report()
        if self.learn:
            kept = sum(f["kept"] for f in self.learned.values())
            report["learned_rounding"] = {"options": dict(self.learn), "blocks": dict(self.learned),
                                          "seconds": clock.seconds.get("learned rounding", 0.0)}
            logger.info("learned rounding: kept in %d/%d blocks, %.1f s this run", kept, len(self.learned),
                        report["learned_rounding"]["seconds"])
        return report

    # ------------------------------------------------------------------------------------------------ phases
    def _fisher(self) -> dict[str, torch.Tensor]:
        job = self.job
        if "fisher" not in job.method.needs:
            return {}
        if self.saved:
            return {n: self.saved[f"fisher.{n}"] for n in job.targets}
        with self.clock("fisher"):
            return fisher_rows(job.model, job.modules, self.data.train_batches, job.progress)

    def _plan(self) -> dict[str, int | None]:
        job = self.job
        if self.saved:
            return self.ckpt.extra["plan"]
        if job.alloc == "uniform":
            return uniform_plan(job.config, job.method, job.shapes, job.factor_bits)
        spectra = self._spectra()
        if job.alloc == "loss":
            with self.clock("sensitivity"):
                sens = output_sensitivity(job.model, job.modules, self.data.train_batches, job.progress)
            return allocate_energy(spectra, job.shapes, job.config.ratio, weights=sens, relative=False)
        return allocate_energy(spectra, job.shapes, job.config.ratio)

    def _expert_bits(self) -> dict[str, int]:
        """With ``expert_bits``: each expert layer's bit width, from the router's use of the experts on the training
        windows (dense model) under the budget ``bits`` (`allocate_expert_bits`); with ``expert_bits_by="error"``
        weighted by each layer's measured output error at each width (`expert_errors`)."""
        job = self.job
        if not job.config.expert_bits:
            return {}
        if job.config.expert_bits_by == "importance":  # allocated before the experts were split (`_allocate_experts`)
            return job.bits
        if self.saved:
            return self.ckpt.extra["bits"]
        with self.clock("routing statistics"):
            usage = expert_usage(job.model, job.targets, self.data.train_batches)
        if not usage:
            logger.warning("expert_bits: no expert among the targets; every layer gets bits=%d", job.config.bits)
            return {}
        errors = None
        if job.config.expert_bits_by == "error":
            with self.clock("expert errors"):
                errors = expert_errors(job.model, list(usage), self.data.train_batches, job.config.expert_bits,
                                       job.config.group_size)
        bits = allocate_expert_bits(usage, {n: o * i for n, (o, i) in job.shapes.items() if n in usage},
                                    job.config.expert_bits, job.config.bits, errors)
        widths = sorted(set(bits.values()))
        logger.info("expert_bits: %s", ", ".join(f"{sum(b == w for b in bits.values())} expert layers at {w} bits"
                                               for w in widths))
        return bits

    def _layer_bits(self) -> dict[str, int]:
        """With ``avg_bits``: every target's format (width from ``bit_choices``, group size from ``group_choices``)
        under the budget (`allocate_layer_formats`), from each layer's loss increase estimated in each format on the
        dense model: the mean squared loss gradient at its output (`output_sensitivity`) times the activation-weighted
        error of quantizing it (`layer_errors`, with the Gram of its inputs on the training windows, one block at a
        time). Layers fed the same input share a format. With ``bits_sensitivity="measured"`` the gradient pass is
        skipped and each unit's errors are scaled to the measured KL of quantizing it alone (`_measure`). Sets
        ``job.group_sizes``; returns the widths."""
        job, clock, stack, runner, config = self.job, self.clock, self.stack, self.runner, self.job.config
        if self.saved:
            job.group_sizes = dict(self.ckpt.extra.get("group_sizes", {}))
            return self.ckpt.extra["bits"]
        measured = config.bits_sensitivity == "measured"
        if measured:  # each unit's level is measured below: no gradient pass
            sens = dict.fromkeys(job.modules, 1.0)
            with clock("bits: measured sensitivity"):
                probe = [s for b in self.data.train_batches for s in samples_of(b, device_of(job.model))][:PROBE]
                reference = [model_output(job.model, s) for s in probe]
        else:
            with clock("bits: sensitivity"):
                sens = output_sensitivity(job.model, job.modules, self.data.train_batches, job.progress)
        n_train = self.data.n_train_batches
        hidden = runner.hidden[:n_train]
        sdt = getattr(torch, config.scale_dtype)
        errors, groups = {}, []
        for i in Progress(range(len(stack.blocks)), "bits: rounding errors", "block", bar=job.progress):
            layers = stack.layers[i]
            local = {stack.local(i, n): m for n, m in layers.items()}
            block_groups = [[stack.full(i, n) for n in g] for g in input_groups(stack.blocks[i], local, runner, i,
                                                                                  hidden[0])]
            groups += block_groups
            with clock("bits: statistics and forward"):
                out: list[torch.Tensor] = []
                stats = collect(runner, i, stack.blocks[i], layers, hidden, n_train, self.fisher, need_gram=True,
                                outputs=out, all_experts=self.all_experts)
            with clock("bits: rounding errors"):
                for n in layers:
                    err = layer_errors(job.method, job.targets[n].weight().float(), stats[n], config, sdt,
                                       calibrate=self.method_error)
                    errors[n] = {f: sens[n] * e for f, e in err.items()}
            if measured:
                with clock("bits: measured sensitivity"):
                    for unit in block_groups:
                        self._measure(unit, stats, errors, sdt, probe, reference)
            hidden = out
        scale_bits = 8 * torch.empty(0, dtype=sdt).element_size()
        formats = allocate_layer_formats(errors, job.shapes, groups, config.avg_bits, scale_bits)
        bits = {n: b for n, (b, _) in formats.items()}
        job.group_sizes = {n: g for n, (_, g) in formats.items()}
        stored = sum(stored_bits(*job.shapes[n], b, g, scale_bits) for n, (b, g) in formats.items())
        weights = sum(o * i for o, i in job.shapes.values())
        counts = collections.Counter(formats.values())
        logger.warning("avg_bits %g: %s; %.4f bits per weight as stored (estimated loss increase %.4g)",
                       config.avg_bits, ", ".join(f"{counts[f]} layers at {f[0]} bits g{f[1]}" for f in sorted(counts)),
                       stored / weights, sum(errors[n][f] for n, f in formats.items()))
        logger.info("avg_bits: formats per layer: %s", " ".join(f"{n}={b}/g{g}" for n, (b, g) in formats.items()))
        uniform = {f: sum(e[f] for e in errors.values()) for f in set.intersection(*(set(e) for e in errors.values()))}
        logger.info("avg_bits: estimated loss increase of every layer in one format: %s",
                    ", ".join(f"{b} bits g{g}: {v:.4g}" for (b, g), v in sorted(uniform.items())))
        return bits

    def _measure(self, unit: list[str], stats, errors: dict, sdt, probe, reference) -> None:
        """Measured sensitivity (``avg_bits``): quantize the layers of ``unit`` alone (the rest of the model dense) by
        the run's method in its cheapest format — the fewest bits, the largest group — measure how far the model's
        outputs move on the probe windows (`output_divergence`: the mean KL of the next-token distributions), and
        scale the unit's estimated errors in every format so that in that format they equal the measurement."""
        job = self.job
        common = set.intersection(*(set(errors[n]) for n in unit))
        low = min(b for b, _ in common)
        fmt = (low, max(g for b, g in common if b == low))
        saved = {}
        try:
            for n in unit:
                w = dense_weight(job.modules[n])
                q = job.method.quantize(w.detach().float(), fmt[0], fmt[1], stats[n], sdt)
                saved[n] = w.detach().clone()
                with torch.no_grad():
                    w.copy_(q.dequantize()[:, :w.shape[1]].to(w))
            moved = output_divergence(job.model, probe, reference)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    dense_weight(job.modules[n]).copy_(w)
        estimate = sum(errors[n][fmt] for n in unit)
        scale = max(moved, 1e-30) / estimate if estimate > 0 else 1.0
        for n in unit:
            errors[n] = {f: e * scale for f, e in errors[n].items()}
        logger.info("bits: %s quantized alone at %d bits g%d: KL %.4g (estimated %.4g)", "+".join(unit), fmt[0],
                    fmt[1], moved, estimate)

    def _spectra(self) -> dict[str, torch.Tensor]:
        """Each target's spectrum in its method's metric, from statistics on the dense stream."""
        job, clock, stack, runner = self.job, self.clock, self.stack, self.runner
        method, n_train = job.method, self.data.n_train_batches
        spectra = {}
        hidden = runner.hidden[:n_train]  # spectra are of the training windows: held-out ones are not run
        for i in Progress(range(len(stack.blocks)), "measure spectra", "block", bar=job.progress):
            layers = stack.layers[i]
            with clock("spectra: statistics and forward"):  # the block's outputs come from the same forward
                out: list[torch.Tensor] = []
                stats = collect(runner, i, stack.blocks[i], layers, hidden, n_train, self.fisher,
                                need_gram=self.need_gram, outputs=out, all_experts=self.all_experts,
                                output_gram={n for n in layers if method.spectrum_from_outputs(*job.shapes[n])})
            with clock("spectra: spectrum"):
                spectra.update(method.spectra(stats, lambda n: job.targets[n].weight().float()))
            hidden = out
        return spectra

    def _compress(self, plan: dict[str, int | None]) -> dict:
        """The compression pass over the blocks; returns each fitted layer's choice (β)."""
        job, clock, stack, runner, saved = self.job, self.clock, self.stack, self.runner, self.saved
        need_cross, need_ref = self.need_cross, self.need_ref
        comp = list(runner.hidden)
        ref = list(runner.hidden) if need_ref else None
        betas = {}
        done = restore(self.ckpt, job.model, len(stack.blocks))
        if done:
            comp = [saved[f"comp.{b}"] for b in range(len(comp))]
            ref = [saved[f"ref.{b}"] for b in range(len(comp))] if need_ref else None
            betas = self.ckpt.extra["betas"]
            self.learned = dict(self.ckpt.extra.get("learned", {}))
            self.scaled = dict(self.ckpt.extra.get("scaled", {}))
            self.folded = {k[len("folded."):]: t for k, t in saved.items() if k.startswith("folded.")}
            with torch.no_grad():  # what the finished blocks' scales changed outside their (restored) layers
                for name, t in self.folded.items():
                    job.model.get_parameter(name).copy_(t)
            runner.inputs[:done] = [[] for _ in range(done)]
        for i in Progress(range(len(stack.blocks)), job.config.method, "block", bar=job.progress, skipped=done):
            block = stack.blocks[i]
            todo = {n: m for n, m in stack.layers[i].items() if plan[n] is not None or job.method.corrects_dense}
            learned = None
            if todo:
                if self.scaling:
                    with clock("channel scales"):
                        self._scale(i, block, todo, comp)
                if self.learn and not need_cross:  # the dense block's outputs, before its layers are replaced
                    with clock("reference forward"):
                        ref_out = runner.run(i, block, ref)
                records = {} if self.learn else None
                dense_out = self._fit_block(i, block, todo, plan, comp, ref, betas, records)
                ref = dense_out if need_cross else ref_out if need_ref else None
                if records:
                    learned = self._learn(i, block, records, comp, ref)
            elif need_ref:
                with clock("reference forward"):
                    ref = runner.run(i, block, ref)
            if learned is not None:
                comp = learned
            else:
                with clock("compressed forward"):
                    comp = runner.run(i, block, comp)
            runner.inputs[i] = []  # this block's captured calls are no longer needed
            if self.ckpt:
                self._checkpoint(i, list(todo), plan, betas, comp, ref)
        return betas

    def _scale(self, i: int, block: nn.Module, todo: dict[str, nn.Module], comp: list) -> None:
        """Channel scales (`hf_compress.transforms.channel_scales`) of block i, still dense, before its layers are
        fitted: the mappings among its targets ``todo`` that are exact, each one's scales searched on the statistics
        of the compressed stream ``comp`` and folded into the block."""
        job, stack, runner = self.job, self.stack, self.runner
        local = {stack.local(i, n): m for n, m in todo.items()}
        mappings = channel_scales.candidates(block, local, runner, i, comp[0])
        kept, left = channel_scales.exact(block, mappings, runner, i, comp[0], seed=i)
        readers = {r for m in kept for r in m.readers}
        stats = collect(runner, i, block, {stack.full(i, r): local[r] for r in readers}, comp,
                        self.data.n_train_batches, {}, need_gram=True, all_experts=self.all_experts) if readers else {}
        sdt = getattr(torch, job.config.scale_dtype)
        chosen = {}
        for m in kept:
            names = [stack.full(i, r) for r in m.readers]
            st = stats[names[0]]
            formats = [(job.config_for(n).bits, job.config_for(n).group_size) for n in names]
            best = channel_scales.search(m, [dense_weight(local[r]) for r in m.readers], st.absmean,
                                         st.gram / max(st.count, 1), formats, sdt)
            chosen[m.name] = {"alpha": best["alpha"], **best["error"]}
            if best["scales"] is not None:
                channel_scales.fold(block, m, best["scales"])
                if m.kind == "norm":  # outside the targets: kept for a resumed run
                    self.folded.update({stack.full(i, n): t.detach().clone()
                                        for n, t in channel_scales.producer_params(block, m)})
        self.scaled[str(i)] = {"mappings": chosen, "left": left}
        logger.info("block %d channel scales: %s%s", i, "; ".join(
            f"{n} α={c['alpha']} error x{c['after'] / c['before']:.3f}" if c["alpha"] is not None
            else f"{n} unscaled" for n, c in chosen.items() if c["before"] > 0) or "none",
            f"; left out: {', '.join(left)}" if left else "")

    def _scales_report(self) -> dict:
        """What the channel scales did over the run: mappings scaled / found, the left-out ones with their reasons,
        and the readers' summed rounding error after / before (the search's objective)."""
        chosen = [c for b in self.scaled.values() for c in b["mappings"].values()]
        left = {f"{self.stack.prefix}.{i}.{n}": why for i, b in self.scaled.items() for n, why in b["left"].items()}
        before, after = sum(c["before"] for c in chosen), sum(c["after"] for c in chosen)
        report = {"kind": self.scaling, "scaled": sum(c["alpha"] is not None for c in chosen), "mappings": len(chosen),
                  "left": left, "error_ratio": after / before if before > 0 else 1.0, "blocks": dict(self.scaled)}
        logger.info("channel scales (%s): %d of %d mappings scaled, %d left out; the readers' rounding error x%.3f",
                    self.scaling, report["scaled"], report["mappings"], len(left), report["error_ratio"])
        if left:
            name, why = next(iter(left.items()))
            logger.warning("channel scales (%s) left out %d mapping(s) whose folding changes the block's outputs, "
                           "e.g. %s: %s", self.scaling, len(left), name, why)
        return report

    def _fit_block(self, i: int, block: nn.Module, todo: dict[str, nn.Module], plan, comp, ref, betas: dict,
                   records: dict | None = None):
        """Fit block i's layers ``todo``, group by group of layers sharing an input, on the compressed stream
        ``comp`` (against the reference stream ``ref`` where the method compensates); returns the dense block's
        outputs on ``ref`` (None without compensation). ``records``: filled with each quantized layer's
        (continuous weight, `Quantized`) for learned rounding."""
        job, clock, stack, runner, model = self.job, self.clock, self.stack, self.runner, self.job.model
        method = _Recorder(job.method) if records is not None else job.method
        ref_inputs, ref_out = ({}, None)
        if self.need_cross:
            # experts get no cross terms: the dense and the compressed stream route different tokens to them
            own = {n: m for n, m in todo.items() if not is_expert_layer(model, n)}
            # the block itself, still dense: nothing of it is fitted before this pass ends (a copy would hold
            # a second set of the block's weights, an offloaded MoE block's experts read into RAM)
            with clock("reference forward"):
                ref_inputs, ref_out = reference_inputs(runner, i, block, own, {n: stack.local(i, n) for n in own}, ref)
        local = {stack.local(i, n): m for n, m in todo.items()}
        for group in input_groups(block, local, runner, i, comp[0]):
            names = [stack.full(i, n) for n in group]
            stats = None  # the previous group's statistics go before this group's are gathered (a MoE block's
            # gate/up Grams, one per expert, are its largest memory term; its down Grams would add to them)
            with clock("statistics (partial forwards)"):
                stats = collect(runner, i, block, {n: model.get_submodule(n) for n in names}, comp,
                                self.data.n_train_batches, self.fisher, ref_inputs=ref_inputs, heldout=True,
                                stop_after=True, need_gram=self.need_gram, all_experts=self.all_experts)
            for n in names:
                train_stats, val_stats = stats.pop(n)  # released once fitted (aliases share their Gram)
                with clock("fit (method)"):
                    if plan[n] is not None:
                        choice = replace(model, job.targets[n], method, job.config_for(n), plan[n],
                                         train_stats, val_stats)
                        if records is not None and method.last is not None:
                            records[n], method.last = method.last, None
                    else:
                        choice = correct(model.get_submodule(n), job.method, train_stats, val_stats)
                if choice is not None:
                    betas[n] = choice
                train_stats = val_stats = None
        return ref_out

    def _learn(self, i: int, block: nn.Module, records: dict, comp: list, ref_out: list) -> list[torch.Tensor]:
        """Learned rounding of block i's quantized layers ``records`` (`hf_compress.pipelines.reconstruct`): trained
        on the compressed stream ``comp`` against the dense block's outputs ``ref_out``; the learned codes replace
        the method's when their output error on every calibration window is not larger. Returns the block's
        outputs on ``comp`` (what feeds block i+1)."""
        job, runner, model, opts = self.job, self.runner, self.job.model, self.learn
        sdt = WEIGHT_SCALE_DTYPES[job.config.scale_dtype]
        with self.clock("learned rounding"):
            before = runner.run(i, block, comp)
            mse_before = reconstruct.output_mse(before, ref_out)
            originals = {n: model.get_submodule(n) for n in records}
            learnables = {}
            for n, (weight, q) in records.items():
                m = originals[n]
                cont = q.continuous if q.continuous is not None else weight
                learnables[n] = reconstruct.Learnable(cont, q, m.bias, opts["min_clip"]).to(m.qweight.device)
                set_module(model, n, learnables[n])
            n_train = self.data.n_train_batches
            try:
                losses = reconstruct.train(block, learnables, comp[:n_train], ref_out[:n_train],
                                           runner.inputs[i][:n_train], opts, seed=opts["seed"] * 1_000_003 + i)
                fitted = {n: pack_layer(lrn.quantized(sdt), lrn.in_features, sdt, originals[n].bias,
                                        source=originals[n].source, dtype=originals[n].compute_dtype,
                                        device=originals[n].qweight.device) for n, lrn in learnables.items()}
            finally:
                for n, m in originals.items():
                    set_module(model, n, m)
            for n, m in fitted.items():
                set_module(model, n, m)
            after = runner.run(i, block, comp)
            mse_after = reconstruct.output_mse(after, ref_out)
            kept = mse_after <= mse_before
            if not kept:
                for n, m in originals.items():
                    set_module(model, n, m)
            fit = reconstruct.Fitted(mse_before, mse_after, kept)
            self.learned[str(i)] = fit.as_dict()
            logger.info("block %d learned rounding: output MSE %.4g -> %.4g (%s; step loss %.4g -> %.4g)", i,
                        mse_before, mse_after, "kept" if kept else "not better: the method's codes are kept",
                        losses[0], losses[-1])
        return after if kept else before

    def _checkpoint(self, i: int, names: list[str], plan, betas, comp, ref) -> None:
        """Write block i's layers; commit the streams when due and after the last block."""
        ckpt = self.ckpt
        checkpoint_unit(ckpt, i, self.job.model, names, self.job.targets)
        if ckpt.due() or i == len(self.stack.blocks) - 1:
            streams = {f"comp.{b}": h for b, h in enumerate(comp)}
            streams.update({f"ref.{b}": h for b, h in enumerate(ref or [])})
            streams.update({f"fisher.{n}": f for n, f in self.fisher.items()})
            streams.update({f"folded.{n}": t for n, t in self.folded.items()})
            extra = {"plan": plan, "betas": betas, "bits": self.job.bits}
            if self.job.group_sizes:
                extra["group_sizes"] = self.job.group_sizes
            if self.learn:
                extra["learned"] = self.learned
            if self.scaling:
                extra["scaled"] = self.scaled
            ckpt.commit(i + 1, extra, streams)


def layer_errors(method, weight: torch.Tensor, stats, config, sdt: torch.dtype, calibrate: bool = True
                 ) -> dict[tuple[int, int], float]:
    """``avg_bits``: a layer's activation-weighted quantization error tr(E H Eᵀ) (H = E[xxᵀ] of its inputs) in each
    format (bits, group size) it may get: ``bit_choices`` × the ``group_choices`` that divide its input width
    (`layer_groups`).

    The shape across formats is that of round-to-nearest on the min–max grid (`rounding_error`: cheap in every
    format). With ``calibrate`` it is rescaled to the error of the run's own method (for gptq, what error compensation
    and the grid search leave, which differs from plain rounding by a factor that varies a lot between layers — most
    where a few input channels dominate H — and between formats: a clipping grid gains more on wide groups and at
    fewer bits). The factor is measured in up to four reference formats, the two widths of ``bit_choices`` nearest
    ``avg_bits`` (the lower on a tie) × the layer's smallest and largest group size (one `quantize` call each), and
    interpolated between them (its logarithm bilinear in bits and log group size; constant beyond them)."""
    out, n = weight.shape
    gram = stats.gram / max(stats.count, 1)
    groups = layer_groups(n, config.group_choices)
    rnd = {(b, g): rounding_error(weight, gram, b, g, sdt) for b in config.bit_choices for g in groups}
    if not calibrate:
        return rnd
    ref_bits = sorted(sorted(config.bit_choices, key=lambda b: (abs(b - config.avg_bits), b))[:2])
    ref_groups = sorted({groups[0], groups[-1]})
    log_ratio = {}
    for b in ref_bits:
        for g in ref_groups:
            q = method.quantize(weight, b, g, stats, sdt)
            e = weight - q.dequantize()[:, :n].to(weight)
            own = float(((e @ gram.to(torch.float32)) * e).double().sum())
            log_ratio[(b, g)] = math.log(max(own, 1e-300) / rnd[(b, g)]) if rnd[(b, g)] > 0 else 0.0

    def between(x: float, lo, hi, key=float) -> tuple:  # (lower end, upper end, weight of the upper), clamped
        if key(x) <= key(lo):
            return lo, lo, 0.0
        if key(x) >= key(hi):
            return hi, hi, 0.0
        return lo, hi, (key(x) - key(lo)) / (key(hi) - key(lo))

    errors = {}
    for (b, g), v in rnd.items():
        b0, b1, tb = between(b, ref_bits[0], ref_bits[-1])
        g0, g1, tg = between(g, ref_groups[0], ref_groups[-1], math.log)
        lr = ((1 - tb) * ((1 - tg) * log_ratio[(b0, g0)] + tg * log_ratio[(b0, g1)])
              + tb * ((1 - tg) * log_ratio[(b1, g0)] + tg * log_ratio[(b1, g1)]))
        errors[(b, g)] = v * math.exp(lr)
    return errors


class _Recorder:
    """``method`` that keeps what its last `quantize` call was given and returned, (weight, `Quantized`), in
    ``last``: the starting point of learned rounding."""

    def __init__(self, method):
        self._method, self.last = method, None

    def __getattr__(self, name):
        return getattr(self._method, name)

    def quantize(self, weight, *args, **kwargs):
        q = self._method.quantize(weight, *args, **kwargs)
        self.last = (weight, q)
        return q


def run(job: Job, calibration, tokenizer) -> dict:
    """Compress ``job``'s targets block by block on ``calibration`` (`Sequential.run`)."""
    return Sequential(job, calibration, tokenizer).run()
