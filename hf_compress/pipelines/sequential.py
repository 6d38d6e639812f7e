"""The calibrated pipeline, block by block (`hf_compress.calibration.BlockwiseRunner`):

1. capture every block's inputs for the calibration windows (one forward of the model, block 0 alone computed);
2. when ranks are allocated from measurements: one pass over the blocks on the dense stream, collecting each
   layer's statistics (`hf_compress.statistics`), keeping only its spectrum, then `allocate_energy` under the
   global budget (weighted by `hf_compress.gradients.output_sensitivity` for the ``loss`` allocator);
3. the compression pass, block i at a time: inside the block, layers that share an input (q/k/v; o; gate/up;
   down) are fitted group by group on the inputs the *compressed* model really produces (blocks 0..i-1 and the
   block's earlier groups already compressed) against the dense model's inputs where the method compensates;
   then the compressed block produces block i+1's inputs. One block and the calibration activations are what
   is held at any time. With a checkpoint folder, each finished block is written there and the streams are
   committed (`hf_compress.resume`), so that a resumed run continues bit for bit.

The blocks are one `Stack`: the list of repeated blocks that holds the targets, and the targets inside each.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..allocation import allocate_energy, allocate_expert_bits, plan as uniform_plan
from ..calibration import (BlockwiseRunner, calibration_windows, input_groups, is_multimodal_source,
                           multimodal_inputs)
from ..errors import CheckpointError
from ..factory import correct, replace
from ..gradients import fisher_rows, output_sensitivity
from ..modules.experts import is_expert_layer
from ..progress import Progress
from ..statistics import collect, expert_errors, expert_usage, reference_inputs
from ..targets import block_index, find_blocks
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


class Sequential:
    """One run of the calibrated pipeline over ``job``'s targets (`run`)."""

    def __init__(self, job: Job, calibration, tokenizer):
        self.job = job
        self.clock = Phases()
        self.data = Windows.of(job, calibration, tokenizer)
        self.need_gram = needs_gram(job.config, job.method)
        self.need_cross = "cross" in job.method.needs
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
        job.bits = self._expert_bits()
        betas = self._compress(plan)
        model.train(was_training)
        logger.info("time by phase: %s", clock)
        return {"ranks": plan, "betas": betas, "seconds": time.time() - job.started,
                "calibration_tokens": self.data.windows.numel(), "phases": dict(clock.seconds)}

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
        need_cross = self.need_cross
        comp = list(runner.hidden)
        ref = list(runner.hidden) if need_cross else None
        betas = {}
        done = restore(self.ckpt, job.model, len(stack.blocks))
        if done:
            comp = [saved[f"comp.{b}"] for b in range(len(comp))]
            ref = [saved[f"ref.{b}"] for b in range(len(comp))] if need_cross else None
            betas = self.ckpt.extra["betas"]
            runner.inputs[:done] = [[] for _ in range(done)]
        for i in Progress(range(len(stack.blocks)), job.config.method, "block", bar=job.progress, skipped=done):
            block = stack.blocks[i]
            todo = {n: m for n, m in stack.layers[i].items() if plan[n] is not None or job.method.corrects_dense}
            if todo:
                ref_out = self._fit_block(i, block, todo, plan, comp, ref, betas)
                ref = ref_out if need_cross else None
            elif need_cross:
                with clock("reference forward"):
                    ref = runner.run(i, block, ref)
            with clock("compressed forward"):
                comp = runner.run(i, block, comp)
            runner.inputs[i] = []  # this block's captured calls are no longer needed
            if self.ckpt:
                self._checkpoint(i, list(todo), plan, betas, comp, ref)
        return betas

    def _fit_block(self, i: int, block: nn.Module, todo: dict[str, nn.Module], plan, comp, ref, betas: dict):
        """Fit block i's layers ``todo``, group by group of layers sharing an input, on the compressed stream
        ``comp`` (against the reference stream ``ref`` where the method compensates); returns the dense block's
        outputs on ``ref`` (None without compensation)."""
        job, clock, stack, runner, model = self.job, self.clock, self.stack, self.runner, self.job.model
        ref_inputs, ref_out = ({}, None)
        if self.need_cross:
            # experts get no cross terms: the dense and the compressed stream route different tokens to them
            own = {n: m for n, m in todo.items() if not is_expert_layer(model, n)}
            with clock("reference forward"):
                ref_inputs, ref_out = reference_inputs(runner, i, copy.deepcopy(block), own,
                                                       {n: stack.local(i, n) for n in own}, ref)
        local = {stack.local(i, n): m for n, m in todo.items()}
        for group in input_groups(block, local, runner, i, comp[0]):
            names = [stack.full(i, n) for n in group]
            with clock("statistics (partial forwards)"):
                stats = collect(runner, i, block, {n: model.get_submodule(n) for n in names}, comp,
                                self.data.n_train_batches, self.fisher, ref_inputs=ref_inputs, heldout=True,
                                stop_after=True, need_gram=self.need_gram, all_experts=self.all_experts)
            for n in names:
                train_stats, val_stats = stats[n]
                with clock("fit (method)"):
                    if plan[n] is not None:
                        choice = replace(model, job.targets[n], job.method, job.config_for(n), plan[n],
                                         train_stats, val_stats)
                    else:
                        choice = correct(model.get_submodule(n), job.method, train_stats, val_stats)
                if choice is not None:
                    betas[n] = choice
        return ref_out

    def _checkpoint(self, i: int, names: list[str], plan, betas, comp, ref) -> None:
        """Write block i's layers; commit the streams when due and after the last block."""
        ckpt = self.ckpt
        checkpoint_unit(ckpt, i, self.job.model, names, self.job.targets)
        if ckpt.due() or i == len(self.stack.blocks) - 1:
            streams = {f"comp.{b}": h for b, h in enumerate(comp)}
            streams.update({f"ref.{b}": h for b, h in enumerate(ref or [])})
            streams.update({f"fisher.{n}": f for n, f in self.fisher.items()})
            ckpt.commit(i + 1, {"plan": plan, "betas": betas, "bits": self.job.bits}, streams)


def run(job: Job, calibration, tokenizer) -> dict:
    """Compress ``job``'s targets block by block on ``calibration`` (`Sequential.run`)."""
    return Sequential(job, calibration, tokenizer).run()
