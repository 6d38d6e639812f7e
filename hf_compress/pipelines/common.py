"""What both pipelines share: the `Job` (a run's settings and targets), wall time per phase, and the resume glue
(restoring finished units from a checkpoint folder, writing a unit and releasing its offloaded layers)."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ..resume import Checkpoint, fingerprint
from ..targets import Target, is_offloaded

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One compression run: the model, its settings, the method instance, the allocator and the targets."""

    model: nn.Module
    config: Any  # CompressionConfig
    method: Any  # CompressionMethod
    alloc: str
    targets: dict[str, Target]
    progress: bool = True
    checkpoint_dir: Any = None
    checkpoint_every: float = 60.0
    started: float = field(default_factory=time.time)
    #: per-layer bit widths that differ from ``config.bits`` (``expert_bits``: `hf_compress.allocation.allocate_expert_bits`;
    #: ``avg_bits``: `hf_compress.allocation.allocate_layer_formats`, every target)
    bits: dict[str, int] = field(default_factory=dict)
    #: per-layer group sizes (``avg_bits`` with ``group_choices``: `hf_compress.allocation.allocate_layer_formats`)
    group_sizes: dict[str, int] = field(default_factory=dict)

    def config_for(self, name: str):
        """The settings layer ``name`` is compressed with: the run's config, with its own bit width and group size if
        it has them."""
        bits = self.bits.get(name, self.config.bits)
        group = self.group_sizes.get(name, self.config.group_size)
        if bits == self.config.bits and group == self.config.group_size:
            return self.config
        config = copy.copy(self.config)
        config.bits, config.group_size = bits, group
        return config

    @cached_property
    def modules(self) -> dict[str, nn.Module]:
        return {n: t.module for n, t in self.targets.items()}

    @cached_property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: t.shape for n, t in self.targets.items()}

    @cached_property
    def factor_bits(self) -> dict[str, int]:
        """Bits per element of each target's dense weight: what a float EoRA factor costs (`allocation.plan`)."""
        return {n: 8 * t.module.weight.element_size() for n, t in self.targets.items()}

    def checkpoint(self, windows: torch.Tensor | None = None) -> Checkpoint | None:
        """The run's `Checkpoint` when it has a folder (``windows``: the calibration windows, part of what must
        match to resume); falsy otherwise."""
        return self.checkpoint_dir and Checkpoint(self.checkpoint_dir, fingerprint(self.config, self.modules, windows),
                                                  self.checkpoint_every)


class Phases:
    """Wall time per phase of a pipeline: ``with clock("capture"): ...`` (logged at INFO)."""

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


def checkpoint_unit(ckpt: Checkpoint, unit: int, model: nn.Module, names: list[str], targets: dict[str, Target]) -> None:
    """Write unit ``unit``'s modules ``names``; those replacing an offloaded layer are then read from that file
    (memory-mapped) instead of staying in RAM."""
    ckpt.save_unit(unit, model, names)
    ckpt.release_unit(unit, model, [n for n in names if is_offloaded(targets[n].module)])


def restore(ckpt: Checkpoint | None, model: nn.Module, n_units: int) -> int:
    """Put the checkpointed units back into ``model``; the number of units restored."""
    if not ckpt or not ckpt.done:
        return 0
    for u in range(ckpt.done):
        ckpt.restore_unit(u, model)
    logger.warning("resuming from %s: %d/%d blocks already compressed", ckpt.folder, ckpt.done, n_units)
    return ckpt.done
