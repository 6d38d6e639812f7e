"""Writing files and folders atomically: everything is written under a temporary name beside the target and renamed
into place (``os.replace``) only once complete, so an interrupted write (an exception, a killed process) never
leaves a half-written file or folder under the target's name. The one implementation of it in hf-compress: the
checkpoint folder (`hf_compress.saving`), the evaluation records and model card (`hf_compress.hub`), the resume
state (`hf_compress.resume`) and exports (`hf_compress.export`, GGUF included) all write through it.

What a kill leaves behind is a temporary name starting with a dot (``.tmp-NAME-XXXX`` unless a writer names its
own prefix), never mistaken for the target. The result has the permissions of a file or folder written normally
(``0666`` / ``0777`` less the umask), not the ``0600`` / ``0700`` of `tempfile`'s temporaries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(target: str | os.PathLike, prefix: str | None = None):
    """Yield a temporary file path beside ``target``; on success it replaces ``target`` in one rename. If the body
    raises, ``target`` is left as it was and the temporary file is removed. ``prefix``: the temporary file's name
    prefix (default ``.tmp-NAME-``)."""
    target = Path(target).resolve()
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; give a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".tmp-{target.name}-", dir=target.parent)
    os.close(fd)
    mask = _umask()
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    If the body raises (or the process dies), ``target`` is left as it was and the temporary folder is removed
    (or, after a kill, left under a ``.tmp-`` name that is never mistaken for the checkpoint)."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    mask = _umask()
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
