"""Resumable compression: finished units (blocks) checkpointed as safetensors in a folder beside the output.

Layout of the folder::

    state.json              the commit point: what run this is (``fingerprint``), how many units are final
                            (``done``), the rank plan and per-layer choices (``extra``)
    unit-00003.safetensors  the compressed modules of unit 3 (their tensors; their records in the metadata)
    streams.safetensors     tensors the next unit starts from (the calibration hidden states of the sequential
                            engine; fisher rows), as of ``done``

Every file is written under a temporary name and renamed into place (`hf_compress.atomic`), and ``state.json`` is
written last, so a run killed at any instant leaves either the previous commit or the new one, never a mix.
Resuming restores units ``0..done-1`` and the streams, then runs exactly the code an uninterrupted run would have
run from unit ``done`` on: the result is the same bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_file
from .errors import CheckpointError, ConfigError
from .kernels.cpu.paging import release_pages
from .modules import MODULE_TYPES
from .targets import dense_weight, set_module, shape_of

logger = logging.getLogger(__name__)

STATE = "state.json"
STREAMS = "streams.safetensors"


def fingerprint(config, targets: dict[str, nn.Module], windows: torch.Tensor | None = None) -> dict:
    """What must match for a checkpoint to be resumed: the compression settings (not the informational fields),
    the targeted layers and their shapes, and a digest of the calibration windows."""
    cfg = config.to_dict()
    for key in ("provenance", "modules", "hf_compress_version"):
        cfg.pop(key, None)
    cfg["calibration"] = {k: v for k, v in (cfg.get("calibration") or {}).items() if k != "source"}
    fp = {"config": cfg, "targets": {n: list(shape_of(m)) for n, m in targets.items()}}
    if windows is not None:
        fp["windows"] = hashlib.sha256(windows.cpu().long().numpy().tobytes()).hexdigest()
    return json.loads(json.dumps(fp))  # the form it has once read back from state.json


def _home(module: nn.Module) -> torch.device:
    """Where a compressed replacement of ``module`` lives: its weights' device, or, for a module offloaded by
    accelerate (weights on ``meta``), its hook's execution device."""
    for p in module.parameters(recurse=False):
        if p.device.type != "meta":
            return p.device
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device if device is not None else "cpu")


def _own(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of module ``name`` in a unit file's ``tensors``, keyed as in its state dict."""
    return {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}


def offload_folder(model: nn.Module) -> str | None:
    """accelerate's disk-offload folder of ``model`` (``from_pretrained(..., offload_folder=...)``), read from an
    offloaded module's hook: ``AlignDevicesHook.weights_map`` (a ``PrefixedDataset``) → ``.dataset`` (an
    ``OffloadedWeightsLoader``) → ``.save_folder``. None where no hook has one (CPU offload, no offload)."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            folder = getattr(getattr(getattr(h, "weights_map", None), "dataset", None), "save_folder", None)
            if folder is not None and os.path.isdir(folder):
                return str(folder)
    return None


@contextlib.contextmanager
def scratch_folder(model: nn.Module):
    """A folder to checkpoint finished blocks in, for a `compress` call given no ``checkpoint_dir`` on a model that
    accelerate offloaded in part: with it, the compressed layers of offloaded blocks are read from their unit
    files (`Checkpoint.release_unit`) instead of piling up in RAM until the save, as with a checkpoint folder. Made
    in the disk-offload folder where there is one (the place set aside for the model's bytes; a temp dir may be
    RAM-backed), else in the temp dir; deleted on exit, the layers keeping their mappings of the deleted files.
    Yields None (nothing to do) for a model with no layer offloaded to run on the CPU (layers that run on an
    accelerator are not released), and off Linux, where no pages are released and a mapped file cannot always be
    deleted."""
    offloaded = any(any(p.device.type == "meta" for p in m.parameters(recurse=False)) and _home(m).type == "cpu"
                    for m in model.modules())
    if not offloaded or not sys.platform.startswith("linux"):
        yield None
        return
    folder = tempfile.mkdtemp(prefix=".hf-compress-blocks-", dir=offload_folder(model))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Checkpoint:
    """Checkpoints of one compression run in ``folder``. ``every``: seconds between commits of the streams (the
    compressed modules of each unit are written as soon as it is done; they are cheap)."""

    def __init__(self, folder: str | os.PathLike, fp: dict, every: float = 60.0):
        self.folder, self.fp, self.every = Path(folder), fp, float(every)
        self.last_commit = time.time()
        self.state = self._read()

    def _read(self) -> dict | None:
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"Resume state {path} is corrupt ({e}); delete {self.folder} to start over.") from None
        if state.get("fingerprint") != self.fp:
            ours, theirs = self.fp, state.get("fingerprint") or {}
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if "config" in diff:
                a, b = ours["config"], theirs.get("config", {})
                diff = [f"config.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] + diff[1:]
            raise ConfigError(f"{self.folder} holds an interrupted compression with other settings ({', '.join(diff)} "
                              "differ); rerun with the same settings, or delete it to start over.")
        return state

    @property
    def done(self) -> int:
        return int(self.state["done"]) if self.state else 0

    @property
    def extra(self) -> dict:
        return self.state.get("extra", {}) if self.state else {}

    def streams(self) -> dict[str, torch.Tensor]:
        path = self.folder / STREAMS
        return load_file(path) if self.done and path.is_file() else {}

    def _unit_file(self, unit: int) -> Path:
        return self.folder / f"unit-{unit:05d}.safetensors"

    def due(self) -> bool:
        return time.time() - self.last_commit >= self.every

    # ------------------------------------------------------------------------------------------------ writing
    def save_unit(self, unit: int, model: nn.Module, names) -> None:
        """Write the current modules ``names`` of ``model`` (compressed, or dense weights refitted in place)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors, records = {}, {}
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, tuple(MODULE_TYPES.values())):
                records[name] = {"record": module.record(), "shape": [module.out_features, module.in_features]}
                for k, t in module.state_dict().items():
                    tensors[f"{name}.{k}"] = t.detach().contiguous()
            else:
                records[name] = {"record": {"type": "dense"}}
                tensors[f"{name}.weight"] = dense_weight(module).detach().contiguous()
        meta = {"modules": json.dumps(records)}
        with atomic_file(self._unit_file(unit)) as tmp:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)

    def release_unit(self, unit: int, model: nn.Module, names) -> None:
        """Point the compressed modules ``names`` of ``unit``, just written by `save_unit`, at their tensors in the
        unit file, memory-mapped (safetensors maps a file it loads): their bytes leave the process's heap and come
        back from the file, through the page cache, only when something reads them (a later forward, the final
        save). What an offloaded run does so that the finished blocks do not pile up in RAM until the model is
        saved (≈ 20 GB for a 7B model in fp32 factors). The values are the same bits; modules not on the CPU
        (on an accelerator) and dense layers are left as they are."""
        modules = {n: model.get_submodule(n) for n in names}
        modules = {n: m for n, m in modules.items() if isinstance(m, tuple(MODULE_TYPES.values()))}
        if not modules:
            return
        tensors = load_file(self._unit_file(unit))
        for name, module in modules.items():
            own = _own(tensors, name)
            mine = module.state_dict()
            if own.keys() != mine.keys() or any(t.device.type != "cpu" for t in mine.values()):
                continue
            module.load_state_dict(own, assign=True)
            for t in own.values():  # pages the read mapped in around the header (the kernel's fault-around)
                release_pages(t)
            for m in module.modules():  # a derived copy (the CPU kernels' repacked weight) read the old tensors
                getattr(m, "_kernel_cache", {}).clear()

    def commit(self, done: int, extra: dict, streams: dict[str, torch.Tensor] | None = None) -> None:
        """Declare units ``0..done-1`` final; ``streams``: the tensors the run continues from."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if streams:
            with atomic_file(self.folder / STREAMS) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in streams.items()}, str(tmp))
        self.state = {"fingerprint": self.fp, "done": done, "extra": extra}
        with atomic_file(self.folder / STATE) as tmp:
            tmp.write_text(json.dumps(self.state), encoding="utf-8")
        self.last_commit = time.time()

    # ------------------------------------------------------------------------------------------------ reading
    def restore_unit(self, unit: int, model: nn.Module) -> None:
        path = self._unit_file(unit)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing although {STATE} says unit {unit} is done; delete "
                                  f"{self.folder} to start over.")
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            records = json.loads(f.metadata()["modules"])
        for name, entry in records.items():
            record, old = entry["record"], model.get_submodule(name)
            own = _own(tensors, name)
            if record["type"] == "dense":
                with torch.no_grad():
                    dense_weight(old).copy_(own["weight"])
                continue
            out_f, in_f = entry["shape"]
            # the compute dtype is the dense weight's, as when it was compressed (`factory.replace`)
            new = MODULE_TYPES[record["type"]].from_record(record, in_f, out_f, device="meta",
                                                           dtype=dense_weight(old).dtype)
            new.load_state_dict(own, assign=True)
            set_module(model, name, new.to(_home(old)))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
