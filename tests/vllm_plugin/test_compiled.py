"""The plugin in vLLM's default compiled mode (torch.compile; every other plugin test runs eager): a 4-bit checkpoint's
layers run their CPU int4 plan as one opaque op (`hf_compress::int4_plan`), at decode (the int4 kernel) and at a
prefill of >= 128 rows (the dequantized GEMM), which dynamo could not trace. Greedy tokens agree with transformers'
within the fp32 tolerance of tests/vllm_plugin/test_avx2.py (which CPU path a row takes depends on its batch)."""

from __future__ import annotations

from test_avx2 import FP32_TOL, LONG
from vllm_helpers import NEW_TOKENS, PROMPTS, assert_agrees, compressed, vllm_run


def test_compiled_mode_serves_a_4bit_checkpoint(tmp_path):
    path = compressed("llama", {"method": "rtn", "bits": 4, "group_size": 32}, tmp_path / "rtn4")
    proc = vllm_run([path], prompts=PROMPTS + [LONG], max_model_len=256, enforce_eager=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    tokens, logprobs = proc.result[str(path)], proc.result["logprobs:" + str(path)]
    at = assert_agrees(path, PROMPTS + [LONG], tokens, logprobs, FP32_TOL, "rtn 4-bit g32, compiled")
    print(f"compiled: greedy tokens agreeing per prompt {[NEW_TOKENS if a is None else a for a in at]}")
