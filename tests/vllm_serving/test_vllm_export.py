"""The compressed-tensors export of a 4-bit SmolLM2 in stock vLLM 0.32 (CPU, fp16 activations, W4A16 kernel).

Tolerances. vLLM computes in fp16 where ours runs in fp32, with the same weights (codes, fp16 scales and integer
zero points are exact in both). Ours is scored teacher-forced on vLLM's own greedy continuation, so every position
compares the two on the same context: vLLM's log-probability of each token it chose must be within ``LOGPROB_TOL``
nats of ours. Greedy continuations agree with ours token for token until a position where vLLM's token is a
near-tie for ours (within ``TIE`` nats of our best); the first divergence of each prompt is printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from serving import (NEW_TOKENS, PROMPTS, greedy, require_vllm_w4a16, run_engine, smollm2,  # noqa: F401  (fixtures)
                     token_logprobs, vllm_runs)

LOGPROB_TOL = 0.1
TIE = 0.1


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _assert_agrees(model, prompt: list[int], tokens: list[int], logprobs: list[float], ours: list[int],
                   ours_scored: list[float]) -> None:
    """vLLM's greedy ``tokens`` (and their ``logprobs``) against ``model``'s greedy ``ours`` (and their log-probs
    ``ours_scored``) after ``prompt``: the two agree until a position where vLLM's token is a near-tie for ours
    (within ``TIE`` nats of our best), and every token vLLM chose has ours' teacher-forced log-prob within
    ``LOGPROB_TOL`` nats."""
    scored = token_logprobs(model, prompt + tokens)[len(prompt) - 1:]
    gaps = [abs(a - b) for a, b in zip(logprobs, scored)]
    k = _first_divergence(tokens, ours)
    print(f"max |logprob vLLM - ours| {max(gaps):.4f} nats; first divergence from our greedy tokens: "
          f"{'none in ' + str(len(tokens)) if k is None else k}")
    if k is not None:  # vLLM's token there is a near-tie for ours
        assert ours_scored[k] - scored[k] <= TIE, k
    assert max(gaps) <= LOGPROB_TOL


def _gaps(smollm2, run: dict, ref: str) -> list[list[float]]:
    """|vLLM's logprob − ours| of each token vLLM chose, ours teacher-forced on vLLM's continuation."""
    model = smollm2["refs"][ref]["model"]
    out = []
    for p, tokens, lps in zip(smollm2["prompts"], run["tokens"], run["logprobs"]):
        ours = token_logprobs(model, p + tokens)[len(p) - 1:]
        out.append([abs(a - b) for a, b in zip(lps, ours)])
    return out


def test_export_fits_vllm_cpu_kernel(smollm2):
    r = smollm2["result"]
    assert set(r.packed.values()) == {(4, 64)} and len(r.packed) == 210 and not r.dense
    assert "every packed layer fits vLLM's CPU W4A16 kernel" in r.summary()


def test_greedy_tokens_and_logprobs_agree_with_ours(smollm2, vllm_runs):
    ours, run = smollm2["refs"]["base"], vllm_runs["base"]
    for i, prompt in enumerate(PROMPTS):
        print(f"{prompt!r}:", end=" ")
        _assert_agrees(ours["model"], smollm2["prompts"][i], run["tokens"][i], run["logprobs"][i], ours["tokens"][i],
                       ours["scored"][i])


def test_eora_adapter_moves_vllm_toward_ours(smollm2, vllm_runs):
    """Against our full model (with EoRA), vLLM with the adapter is closer than vLLM without it."""
    mean = {}
    for run in ("base", "lora"):
        gaps = [g for row in _gaps(smollm2, vllm_runs[run], "full") for g in row]
        mean[run] = sum(gaps) / len(gaps)
        agree = [_first_divergence(t, o) for t, o in zip(vllm_runs[run]["tokens"], smollm2["refs"]["full"]["tokens"])]
        print(f"vLLM {run}: mean |logprob - ours with EoRA| {mean[run]:.4f} nats; first divergence from our greedy "
              f"tokens {[NEW_TOKENS if k is None else k for k in agree]}")
    assert mean["lora"] < 0.5 * mean["base"] and mean["lora"] <= LOGPROB_TOL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: dict | None = None, timeout: float = 60):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def test_vllm_serve_answers_one_completion(smollm2, vllm_runs, tmp_path):
    """``vllm serve`` on 127.0.0.1 (through vllm_cli.py: vllm-cpu's own ``vllm`` script cannot start): one greedy
    completion equal to the offline engine's, then a clean shutdown."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_INT4_W4A8": "0"}
    cmd = [sys.executable, str(Path(__file__).with_name("vllm_cli.py")), "serve", str(smollm2["dir"]),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float16", "--max-model-len", "512", "--enforce-eager",
           "--max-num-seqs", "2", "--served-model-name", "smollm2-ct"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, "vllm serve exited early:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if _get(f"http://127.0.0.1:{port}/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve not ready in 600 s"
            time.sleep(2)
        status, body = _get(f"http://127.0.0.1:{port}/v1/completions",
                            {"model": "smollm2-ct", "prompt": smollm2["prompts"][0], "max_tokens": 8,
                             "temperature": 0})
        assert status == 200
        expected = smollm2["tokenizer"].decode(vllm_runs["base"]["tokens"][0][:8])
        print(f"served completion: {body['choices'][0]['text']!r}")
        assert body["choices"][0]["text"] == expected
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode == 0, "vllm serve did not shut down cleanly on SIGINT"


def test_a_compressed_lm_head_exports_and_stock_vllm_serves_it(tmp_path):
    """SmolLM2 with its tied ``lm_head`` compressed too (RTN 4-bit g64; `compress` unties it): the export packs the
    head as a 211th layer and keeps the embedding dense beside it; stock vLLM loads that and its greedy tokens and
    their log-probabilities agree with ours as for the base export (divergences only at near-ties)."""
    require_vllm_w4a16()
    import torch

    import hf_compress
    from hf_compress import CompressionConfig
    from hf_compress.export import export
    from hf_compress.loading import load_model, smollm2_gguf_path

    torch.manual_seed(0)
    model, tokenizer = load_model(smollm2_gguf_path())
    hf_compress.compress(model, CompressionConfig(method="rtn", bits=4, group_size=64,
                                                  targets=[r"re:.*_proj", "lm_head"]), progress=False)
    result = export(model.eval(), tmp_path / "ct", tokenizer=tokenizer)
    assert len(result.packed) == 211 and "lm_head" in result.packed and not result.dense
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" not in config["quantization_config"]["ignore"]

    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    run = run_engine({"model": str(tmp_path / "ct"), "dtype": "float16", "prompts": prompts,
                      "max_tokens": NEW_TOKENS}, tmp_path)["base"]
    ours = model.dequantize()
    for p, tokens, lps in zip(prompts, run["tokens"], run["logprobs"]):
        mine = greedy(ours, p, NEW_TOKENS)
        _assert_agrees(ours, p, tokens, lps, mine, token_logprobs(ours, p + mine)[len(p) - 1:])
