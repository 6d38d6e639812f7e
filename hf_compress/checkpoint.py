"""Reading and checking checkpoint files without loading them, and writing checkpoints atomically."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors file, checking it is complete.

    Raises `CheckpointError` naming the file when it is missing, truncated or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} is missing.")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"Checkpoint file {path} is truncated ({size} bytes, no safetensors header).")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"Checkpoint file {path} is truncated: header of {n} bytes, file of {size}.")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Checkpoint file {path} is corrupt: unreadable safetensors header ({e}).") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"Checkpoint file {path} is truncated: its header describes {8 + n + end} bytes, the file has {size}."
        )
    return header


def read_headers(files: list[str]) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for f in files:
        if str(f).endswith(".safetensors"):
            merged.update(read_safetensors_header(f))
        else:
            raise CheckpointError(f"{f}: hf-compress checkpoints are safetensors only (refusing pickle files).")
    return merged


@contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    If the body raises (or the process dies), ``target`` is left as it was and the temporary folder is removed
    (or, after a kill, left under a ``.tmp-`` name that is never mistaken for the checkpoint)."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; a checkpoint folder gets the usual permissions
    try:
        yield tmp
        for f in tmp.iterdir():  # some writers create 0600 files; a checkpoint gets the usual permissions
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: str | os.PathLike):
    """Yield a temporary file path beside ``target``; on success it replaces ``target`` in one rename. If the body
    raises, ``target`` is left as it was and the temporary file is removed."""
    target = Path(target).resolve()
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; give a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


SHIM_MODULE = "hf_compress_autoload"
SHIM_SOURCE = '''"""Loads an hf-compress checkpoint with trust_remote_code=True. Needs: pip install hf-compress"""
from hf_compress.auto import CompressedConfig, CompressedModel, CompressedModelForCausalLM  # noqa: F401
'''


def write_shim(directory: str | os.PathLike) -> None:
    Path(directory, SHIM_MODULE + ".py").write_text(SHIM_SOURCE, encoding="utf-8")
