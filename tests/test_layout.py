"""The source layout: the repository root holds no importable name that another installed distribution uses.

Python puts the current directory first on sys.path for `python -c`, `python -m` and every subprocess started from
the clone root, so a top-level folder named like an installed package shadows it (our old `kernels/` hid Hugging
Face's `kernels`, which transformers >= 5.25 imports, and no test could start).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys

from conftest import REPO


def _importable_top_level_names(root: str) -> set[str]:
    """Names `import NAME` could find at `root`: modules, packages and folders (namespace packages)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        stem = entry[:-3] if entry.endswith(".py") and os.path.isfile(path) else entry
        if stem.isidentifier() and (os.path.isdir(path) or entry.endswith(".py")):
            names.add(stem)
    return names


def test_no_top_level_name_of_the_repository_is_an_installed_distributions_package():
    installed = md.packages_distributions()
    ours = _importable_top_level_names(REPO)
    assert "hf_compress" in ours
    clashes = {name: installed[name] for name in sorted(ours - {"hf_compress"}) if name in installed}
    assert not clashes, (
        f"the repository root holds names that installed distributions also provide: {clashes}; run from the "
        "clone root, Python imports ours instead of theirs. Move the folder under hf_compress/ (its import path)")


def test_hf_compress_and_transformers_import_from_the_clone_root():
    """`python -c` puts the clone root first on sys.path: the imports that used to find our `kernels/` first."""
    code = ("import hf_compress, transformers.activations, importlib.util, os, sys; "
            "spec = importlib.util.find_spec('hf_compress.kernels'); "
            "print(os.path.dirname(spec.origin))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # the source path is the import path: hf_compress.kernels is the folder hf_compress/kernels of this clone
    assert os.path.realpath(run.stdout.strip()) == os.path.realpath(os.path.join(REPO, "hf_compress", "kernels"))


def test_the_code_map_names_every_module():
    """docs/checkpoint-format.md's Layout block names every module of the package (a file by its name, or a folder
    whose files it lists), so a newcomer's map of the code is complete."""
    import re

    text = open(os.path.join(REPO, "docs", "checkpoint-format.md"), encoding="utf-8").read()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w/]+\.py|\b\w+\b", block))
    package = os.path.join(REPO, "hf_compress")
    missing = []
    for folder, _, files in os.walk(package):
        for f in files:
            if not f.endswith(".py") or f == "__init__.py":
                continue
            stem = f[:-3]
            if f not in named and stem not in named:
                missing.append(os.path.relpath(os.path.join(folder, f), REPO))
    assert not missing, f"docs/checkpoint-format.md's Layout does not name: {sorted(missing)}"
