"""The data-free pipeline: each target is replaced from its weight alone, unit (block) by unit, checkpointed
per unit when the run has a checkpoint folder."""

from __future__ import annotations

import time

from ..allocation import allocate_energy, plan as uniform_plan
from ..factory import replace
from ..progress import Progress
from ..targets import units
from .common import Job, checkpoint_unit, restore


def run(job: Job) -> dict:
    """Compress ``job``'s targets; returns {"ranks": {name: rank|None}, "seconds": ...}."""
    model, config, method, targets = job.model, job.config, job.method, job.targets
    ckpt = job.checkpoint()
    if ckpt and ckpt.done:
        plan = ckpt.extra["plan"]
    elif job.alloc == "uniform":
        plan = uniform_plan(config, method, job.shapes, job.factor_bits)
    else:
        spectra = {n: method.spectrum(t.weight().float()) for n, t in targets.items()}
        plan = allocate_energy(spectra, job.shapes, config.ratio)
    grouped = units(model, targets)
    done = restore(ckpt, model, len(grouped))
    for u in Progress(range(len(grouped)), config.method, "block", bar=job.progress, skipped=done):
        for name in grouped[u]:
            if plan[name] is not None:
                replace(model, targets[name], method, config, plan[name])
        if ckpt:
            checkpoint_unit(ckpt, u, model, [n for n in grouped[u] if plan[n] is not None], targets)
            ckpt.commit(u + 1, {"plan": plan})
    return {"ranks": plan, "seconds": time.time() - job.started}
