"""Calibration: text -> token windows -> per-layer activation statistics, block by block.

Sources: a local text file, a list of strings, a `datasets` dataset (its ``text`` column), or a tensor of token
ids. ``nsamples`` windows of ``seqlen`` tokens are drawn at seeded random offsets of the tokenized text.

`BlockwiseRunner` is the sequential engine. A capture pass records, for every calibration batch, the inputs
(positional args and kwargs: masks, position embeddings) of every decoder block. Afterwards a block can be run
on its own, over all batches, with hooks on its linear layers — one block in memory at a time, plus the
calibration activations. Two streams of hidden states are kept: the *reference* stream (the dense model) and the
*compressed* stream (blocks 0..i-1 already compressed), so that block i's layers can be fitted to the reference
outputs given the inputs they will really see.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import ConfigError, HfCompressError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- sources
def calibration_text(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Calibration text file {source} not found")
        with open(source, encoding="utf-8") as f:
            return f.read()
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        return "\n\n".join(source)
    column = getattr(source, "column_names", None)
    if column is not None:  # a datasets.Dataset
        if "text" not in column:
            raise ConfigError(f"Calibration dataset has no 'text' column (columns: {column})")
        return "\n\n".join(t for t in source["text"] if t)
    raise ConfigError(f"Unsupported calibration source {type(source).__name__}: give a file path, list of strings, "
                      "a datasets.Dataset or a tensor of token ids")


def calibration_windows(source: Any, tokenizer, nsamples: int = 32, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids: random windows (seeded) of the tokenized source. A tensor already shaped
    [n >= nsamples, seqlen] is taken as the windows themselves."""
    if nsamples < 1 or seqlen < 2:
        raise ConfigError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    if isinstance(source, torch.Tensor) and source.ndim == 2 and source.shape[1] == seqlen:
        if source.shape[0] < nsamples:
            raise ConfigError(f"Calibration tensor has {source.shape[0]} windows, fewer than nsamples={nsamples}")
        return source[:nsamples].long()  # already windows: used as given
    if isinstance(source, torch.Tensor):
        ids = source.reshape(-1).long()
    else:
        if tokenizer is None:
            raise ConfigError("A tokenizer is needed to tokenize the calibration text")
        ids = torch.tensor(tokenizer(calibration_text(source), add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen:
        raise ConfigError(f"Calibration text has {ids.numel()} tokens, shorter than one window of {seqlen}.")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def is_multimodal_source(source: Any) -> bool:
    """A list of samples given as dicts: ``{"text": ..., "images": [...]}`` for the model's processor, or model
    inputs already made (``{"input_ids": ..., "pixel_values": ...}``)."""
    return isinstance(source, (list, tuple)) and bool(source) and all(isinstance(s, dict) for s in source)


def multimodal_inputs(source: Any, processor, nsamples: int) -> list[dict[str, torch.Tensor]]:
    """Model inputs for image+text calibration, one dict of tensors (batch of one) per sample, the first
    ``nsamples`` samples: ``{"text": str, "images": [PIL images]}`` (or ``"image"``: one) goes through
    ``processor`` (the model's ``AutoProcessor``, passed as ``tokenizer``), which expands the text's image
    placeholders; a dict that holds ``input_ids`` is used as given. Each sample is one calibration window (``seqlen``
    does not apply)."""
    inputs = []
    for i, sample in enumerate(source[:nsamples]):
        if "input_ids" in sample:
            made = dict(sample)
        else:
            if "text" not in sample:
                raise ConfigError(f"Calibration sample {i} has neither 'text' (with 'images') nor 'input_ids'")
            if processor is None or not callable(processor):
                raise ConfigError("Image+text calibration needs the model's processor: pass tokenizer=AutoProcessor"
                                  ".from_pretrained(...)")
            images = sample.get("images", [sample["image"]] if "image" in sample else None)
            kwargs = {"images": images} if images else {}
            made = dict(processor(text=[sample["text"]], return_tensors="pt", **kwargs))
        made = {k: v for k, v in made.items() if isinstance(v, torch.Tensor)}
        if made.get("input_ids") is None or made["input_ids"].ndim != 2 or made["input_ids"].shape[0] != 1:
            raise ConfigError(f"Calibration sample {i}: input_ids must be a [1, length] tensor")
        inputs.append(made)
    return inputs


# ----------------------------------------------------------------------------------------------- stats
@dataclass
class LayerStats:
    """Sufficient statistics of one linear layer's inputs (fp64 accumulation).

    gram = Σ x_c x_cᵀ over the compressed-stream inputs; cross = Σ x_d x_cᵀ (reference-stream input of the same
    token against the compressed-stream one); ref_gram = Σ x_d x_dᵀ; absmean = mean |x_c| per channel."""

    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    ref_gram: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    count: int = 0
    fisher_rows: torch.Tensor | None = None  # per output row: Σ_j E[g_ij²]
    out_gram: torch.Tensor | None = None  # Σ y yᵀ of the layer's outputs without bias (`add_output`)

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.count, 1)

    def add(self, x: torch.Tensor, x_ref: torch.Tensor | None = None, need_cross: bool = False,
            need_ref_gram: bool | None = None, need_gram: bool = True) -> None:
        """Accumulate one batch (fp64 products: the compensation solves with G_cc⁻¹, whose conditioning an fp32
        Gram would not survive). ``need_ref_gram`` (default: ``need_cross``): also Σ x_d x_dᵀ, which only the
        held-out errors use, so the sequential engine asks for it on held-out batches only. ``need_gram=False``
        (a method that reads only ``absmean``): no Gram, which is most of the work and an n x n fp64 matrix."""
        x = x.reshape(-1, x.shape[-1]).double()
        need_ref_gram = need_cross if need_ref_gram is None else need_ref_gram
        if self.abssum is None:
            n, kw = x.shape[1], {"dtype": torch.float64, "device": x.device}
            self.abssum = torch.zeros(n, **kw)
            if need_gram:
                self.gram = torch.zeros(n, n, **kw)
            if need_cross:
                self.cross = torch.zeros(n, n, **kw)
            if need_ref_gram:
                self.ref_gram = torch.zeros(n, n, **kw)
        if self.gram is not None:
            add_gram(self.gram, x)
        self.abssum += x.abs().sum(0)
        self.count += x.shape[0]
        if need_cross or need_ref_gram:
            xr = x_ref.reshape(-1, x_ref.shape[-1]).double()
            if need_cross:
                self.cross.addmm_(xr.T, x)
            if need_ref_gram:
                add_gram(self.ref_gram, xr)

    def add_output(self, y: torch.Tensor) -> None:
        """Accumulate the Gram of one batch of the layer's outputs y = W x (bias removed): W·G·Wᵀ of the inputs'
        Gram G, whose eigenvalues are the squared singular values of W·S for S·Sᵀ = G — an out x out product
        where the input Gram is in x in (SVD-LLM's spectra, for layers with fewer outputs than inputs). Statistics
        of outputs only: ``add`` is not called on the same instance (``count`` counts the tokens of either)."""
        y = y.reshape(-1, y.shape[-1]).double()
        if self.out_gram is None:
            self.out_gram = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float64, device=y.device)
        add_gram(self.out_gram, y)
        self.count += y.shape[0]

    def merged(self, other: "LayerStats | None") -> "LayerStats":
        """Statistics of both token sets together."""
        if other is None or other.count == 0:
            return self
        def add(a, b):
            return None if a is None else a + b
        return LayerStats(add(self.gram, other.gram), add(self.cross, other.cross), add(self.ref_gram, other.ref_gram),
                          add(self.abssum, other.abssum), self.count + other.count, self.fisher_rows,
                          add(self.out_gram, other.out_gram))

    def check_finite(self, name: str) -> None:
        for key in ("gram", "cross", "ref_gram", "abssum", "fisher_rows", "out_gram"):
            t = getattr(self, key)
            if t is not None and not torch.isfinite(t).all():
                raise HfCompressError(f"NaN/Inf in calibration statistics ({key}) of layer {name}")


GRAM_BLOCK = 192  # measured (fp64, one thread, n = 576 and 1536): 192 and 128 fastest, 256 and 384 much slower


def add_gram(gram: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """gram += xᵀx (x: [tokens, n]) with the products of the block lower triangle only, the blocks above the
    diagonal copied from their mirror images: (k + 1)/2k of a full product's work for k blocks (n = 1536: 9/16),
    and the sum exactly symmetric off the diagonal blocks. Each entry is a dot product over the same tokens as in
    one full xᵀx, so the two differ by rounding only."""
    n = x.shape[1]
    for i in range(0, n, block):
        gram[i : i + block, : i + block].addmm_(x[:, i : i + block].T, x[:, : i + block])
    for i in range(block, n, block):
        gram[:i, i : i + block] = gram[i : i + block, :i].T


# ----------------------------------------------------------------------------------------------- engine
class _Stop(Exception):
    pass


@dataclass
class _Batch:
    args: tuple
    kwargs: dict


@dataclass
class BlockwiseRunner:
    """``windows``: token windows [n, seqlen] run ``batch_size`` at a time, or a list of model-input dicts (image+text
    calibration, `multimodal_inputs`), one forward each."""

    model: nn.Module
    blocks: nn.ModuleList
    windows: torch.Tensor | list
    batch_size: int = 8
    inputs: list[list[_Batch]] = field(default_factory=list)  # [block][batch] -> captured call (args minus hidden)
    hidden: list[torch.Tensor] = field(default_factory=list)  # block-0 inputs per batch

    @torch.no_grad()
    def capture(self) -> None:
        """Run the model once per batch, recording each block's call (hidden states of block 0 only). Only block 0
        is computed: the calls of the others (masks, position embeddings) are made by the model's forward before
        any block runs, so blocks 1.. return their input unchanged, shaped like block 0's real output, and their
        weights are neither used nor loaded. The forward stops as the last block is called (nothing after its
        inputs, the final norm, the LM head and its logits, is computed)."""
        records: list[list[_Batch]] = [[] for _ in self.blocks]
        hidden: list[torch.Tensor] = []
        last = len(self.blocks) - 1
        shape = {}  # block 0's output: a tensor, or a tuple whose first element is the hidden states

        def make_hook(i):
            def hook(module, args, kwargs):
                if i == 0:
                    h = args[0] if args else kwargs["hidden_states"]
                    hidden.append(h.detach().clone())
                rest = args[1:] if args else ()
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                records[i].append(_Batch(rest, kw))
                if i == last:
                    raise _Stop
            return hook

        def passthrough(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            out = shape["out"]
            return h if isinstance(out, torch.Tensor) else (h, *out[1:])

        handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        handles.append(self.blocks[0].register_forward_hook(lambda mod, args, out: shape.__setitem__("out", out)))
        # an instance-level forward (accelerate's offload hooks put theirs there) is put back afterwards
        own = {b: b.__dict__["forward"] for b in self.blocks[1:] if "forward" in b.__dict__}
        for b in self.blocks[1:]:
            b.forward = passthrough
        device = device_of(self.model)
        try:
            for batch in model_batches(self.windows, self.batch_size, device):
                try:
                    self.model(**batch, use_cache=False)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            for b in self.blocks[1:]:
                if b in own:
                    b.forward = own[b]
                else:
                    del b.forward
        self.inputs, self.hidden = records, hidden

    @torch.no_grad()
    def run(self, index: int, block: nn.Module, hidden: list[torch.Tensor], *, per_batch: Callable[[int], None] | None = None,
            stop_after: nn.Module | None = None) -> list[torch.Tensor] | None:
        """Run ``block`` (standing at position ``index``) on every batch of ``hidden``; return its outputs.

        ``per_batch(b)`` is called before batch b; with ``stop_after`` the forward stops once that submodule ran
        (cheap statistics of early layers) and nothing is returned."""
        handle = None
        if stop_after is not None:
            def stop(*_):
                raise _Stop
            handle = stop_after.register_forward_hook(stop)
        outs = []
        try:
            for b, h in enumerate(hidden):
                if per_batch is not None:
                    per_batch(b)
                call = self.inputs[index][b]
                try:
                    out = block(h, *call.args, **call.kwargs)
                except _Stop:
                    continue
                outs.append((out[0] if isinstance(out, tuple) else out).detach())
        finally:
            if handle is not None:
                handle.remove()
        return None if stop_after is not None else outs


def model_batches(windows, batch_size: int, device) -> list[dict[str, torch.Tensor]]:
    """The forward inputs of each calibration batch: slices of ``batch_size`` token windows, or the given input
    dicts one by one, on ``device``."""
    if isinstance(windows, torch.Tensor):
        return [{"input_ids": windows[s : s + batch_size].to(device)} for s in range(0, windows.shape[0], batch_size)]
    return [{k: v.to(device) for k, v in inputs.items()} for inputs in windows]


def device_of(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its first parameter that is not offloaded (meta), else the CPU."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def trace_inputs(block: nn.Module, readers: dict[str, nn.Module], runner: BlockwiseRunner, index: int,
                 hidden: torch.Tensor, producers: dict[str, nn.Module] | None = None
                 ) -> list[tuple[list[str], str | None]]:
    """Run ``block`` once on ``hidden`` and follow its tensors: one entry per distinct input tensor of the
    ``readers`` (in call order), with the readers that receive it and the name of the module of ``producers`` whose
    output that tensor is (None when no producer made it). Readers never called are left out."""
    seen: dict[int, list[str]] = {}
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keep the tensors referenced so that ids are not reused during the probe

    def on_read(name):
        def hook(module, args):
            alive.append(args[0])
            names = seen.setdefault(id(args[0]), [])  # dicts keep insertion order: the call order
            if name not in names:
                names.append(name)
        return hook

    def on_produce(name):
        def hook(module, args, out):
            alive.append(out)
            produced.setdefault(id(out), name)
        return hook

    handles = [m.register_forward_pre_hook(on_read(n)) for n, m in readers.items()]
    handles += [m.register_forward_hook(on_produce(n)) for n, m in (producers or {}).items()]
    try:
        runner.run(index, block, [hidden])
    finally:
        for h in handles:
            h.remove()
    return [(names, produced.get(key)) for key, names in seen.items()]


def input_groups(block: nn.Module, names: dict[str, nn.Module], runner: BlockwiseRunner, index: int,
                 hidden: torch.Tensor) -> list[list[str]]:
    """Group a block's target layers by the input tensor they receive, in call order (q/k/v, o, gate/up, down)."""
    groups = [readers for readers, _ in trace_inputs(block, names, runner, index, hidden)]
    missing = [n for n in names if n not in {m for g in groups for m in g}]
    if missing:
        groups.append(missing)
    return _experts_together(block, groups)


def _experts_together(block: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """One group per expert weight of a split experts module (all experts' ``gate_up_proj``, then all their
    ``down_proj``), at the place of its first member: the experts are independent of one another, and each gets the
    tokens routed to it (a group per expert would cost a partial forward of the block per expert). Experts the probe
    routed nothing to join their weight's group."""
    from .modules.experts import ExpertLinears

    def family(name: str) -> str | None:
        parent = name.rpartition(".")[0]
        return parent if parent and isinstance(block.get_submodule(parent), ExpertLinears) else None

    merged: list[list[str]] = []
    at: dict[str, list[str]] = {}
    for group in groups:
        fams = {family(n) for n in group}
        if len(fams) == 1 and None not in fams:
            fam = fams.pop()
            if fam in at:
                at[fam].extend(n for n in group if n not in at[fam])
                continue
            at[fam] = list(group)
            merged.append(at[fam])
        else:
            merged.append(list(group))
    for group in at.values():  # expert order, the order the experts run in (the last one ends a partial forward)
        group.sort(key=lambda n: int(n.rpartition(".")[2]))
    return merged
