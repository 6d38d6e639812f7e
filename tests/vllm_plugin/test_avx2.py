"""The plugin on a CPU without AVX512 (issue 34): vLLM's AVX2 build and torch's AVX2 kernels, emulated where the CPU
has AVX512 (`avx2/sitecustomize.py`), so these tests run on every machine, never skip.

A 4-bit checkpoint served in fp32, with a prompt long enough for the plugin's prefill path beside two short ones
(>= 128 rows in one batch: the weight dequantized into an fp32 GEMM, no bf16 GEMM on a CPU without native bf16),
must agree with transformers within `FP32_TOL` along vLLM's greedy tokens: which of the two CPU paths a row takes
depends on the rows it is batched with (vLLM prefills the three prompts as one batch; transformers' reference
forward, without a cache, reads every step of the long prompt as a prefill), and the int4 kernel rounds its rows to
bf16, so a near-tie may split; in bf16 — vLLM's default dtype
on CPU — its logprobs must agree within `LOGPROB_TOL` along its own tokens (bf16 rounding of the activations and of
every dense weight moves near-ties; transformers runs fp32).
"""

from __future__ import annotations

import pytest
from vllm_helpers import HERE, NEW_TOKENS, PROMPTS, assert_agrees, compressed, vllm_run

AVX2 = {"HF_COMPRESS_EMULATE_AVX2": "1", "ATEN_CPU_CAPABILITY": "avx2"}
#: a prompt long enough for the prefill path (>= 128 rows: `kernels.cpu.weights.DEQUANTIZE_ROWS`) beside the short ones
LONG = [3 + (7 * i) % 250 for i in range(160)]
LOGPROB_TOL = 0.25  # nats, as tests/vllm_plugin/test_smollm2.py
FP32_TOL = 0.05  # nats: the bf16 rounding of one row's activations at decode is all that differs in fp32


@pytest.fixture(scope="module")
def avx2_env(monkeypatch_module):
    for key, value in AVX2.items():
        monkeypatch_module.setenv(key, value)
    monkeypatch_module.setenv("PYTHONPATH", str(HERE / "avx2"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def rtn4(tmp_path_factory):
    return compressed("llama", {"method": "rtn", "bits": 4, "group_size": 32}, tmp_path_factory.mktemp("avx2") / "rtn4")


def _served(path, dtype):
    proc = vllm_run([path], prompts=PROMPTS + [LONG], max_model_len=256, dtype=dtype)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # the emulation took: vLLM saw no AVX512 and torch ran its AVX2 kernels
    assert proc.result["capability"] == "AVX2" and proc.result["avx512"] is False, proc.result
    return proc.result[str(path)], proc.result["logprobs:" + str(path)]


def test_avx2_fp32_greedy_tokens_agree_with_transformers(avx2_env, rtn4):
    tokens, logprobs = _served(rtn4, "float32")
    at = assert_agrees(rtn4, PROMPTS + [LONG], tokens, logprobs, FP32_TOL, "rtn 4-bit g32 on AVX2, fp32")
    print(f"AVX2 fp32: greedy tokens agreeing per prompt {[NEW_TOKENS if a is None else a for a in at]}")


def test_avx2_bf16_logprobs_agree_with_transformers(avx2_env, rtn4):
    tokens, logprobs = _served(rtn4, "bfloat16")
    at = assert_agrees(rtn4, PROMPTS + [LONG], tokens, logprobs, LOGPROB_TOL, "rtn 4-bit g32 on AVX2, bf16")
    print(f"AVX2 bf16: greedy tokens agreeing per prompt {[NEW_TOKENS if a is None else a for a in at]}")
