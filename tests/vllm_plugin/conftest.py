"""The vLLM plugin tests run in vLLM's own environment (``.venv-vllm``, `scripts/test-vllm`); tests/conftest.py keeps
them out of the main suite, which never imports vLLM."""
