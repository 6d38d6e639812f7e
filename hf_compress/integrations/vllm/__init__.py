"""Serving hf-compress checkpoints in vLLM, installed as ``hf_compress.integrations.vllm``.

vLLM calls `register` in each of its processes through the ``vllm.general_plugins`` entry point, so with
hf-compress installed ``vllm serve DIR`` and ``vllm.LLM(DIR)`` load a compressed checkpoint with no flag:

* `plugin`: vLLM's side — the config parser that unwraps our ``config.json`` into the native config vLLM implements,
  and the ``hf_compress`` `QuantizationConfig` whose linear method runs our modules inside vLLM's linear layers;
* `layout`: torch only (no vLLM import) — each module's tensors and how they shard for tensor parallelism, and the
  per-part modules a (possibly merged) vLLM linear layer holds.
"""


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (idempotent; imports vLLM)."""
    from . import plugin

    plugin.register()
