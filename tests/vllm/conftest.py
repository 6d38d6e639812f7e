"""The vLLM plugin tests run in vLLM's own environment (``.venv-vllm``, `scripts/test-vllm`); where vLLM is not
installed they are not collected, so the main suite never imports it."""

import importlib.util

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["*.py"]
