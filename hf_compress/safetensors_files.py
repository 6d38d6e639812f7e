"""Reading and checking a checkpoint's safetensors files without loading them: each file's header (tensor names,
dtypes, shapes, offsets), checked to be complete, before any weight is read. (Checkpoint folders are written
atomically by `hf_compress.atomic`; the resumable state of an interrupted compression is `hf_compress.resume`.)"""

from __future__ import annotations

import json
import os
import struct
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
