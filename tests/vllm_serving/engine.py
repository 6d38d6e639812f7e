"""Run stock vLLM on a checkpoint in a process of its own (the engine spawns workers; pytest's process stays out of
it): ``python engine.py JOB.json RESULT.json``. Used by tests/vllm_serving and benchmarks/export.py.

JOB: {"model": dir, "dtype": "float16", "adapter": dir or null, "max_lora_rank": 16,
      "prompts": [[ids...]], "max_tokens": 32,      greedy continuations (+ the logprob of each chosen token)
      "score": [[ids...]],                          log-probability of every token after the first, teacher-forced
      "decode": {"tokens": 64, "repeats": 2}}       batch-1 decode tokens/s (best of the repeats)
RESULT: {"base": {...}, "lora": {...}} — one entry per model (without / with the adapter), each with "tokens",
"logprobs", "scored", "decode_tps" for what the job asked.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for these short runs
os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")  # CPUs with AMX would quantize activations to int8 otherwise


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapter = job.get("adapter")
    llm = LLM(job["model"], dtype=job.get("dtype", "float16"), max_model_len=job.get("max_model_len", 1024),
              enforce_eager=True, max_num_seqs=4, seed=0, enable_lora=bool(adapter),
              max_lora_rank=job.get("max_lora_rank", 16), max_loras=1)
    results = {}
    for name, lora in [("base", None)] + ([("lora", LoRARequest("eora", 1, adapter))] if adapter else []):
        r = results[name] = {}
        if job.get("prompts"):
            greedy = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 32), logprobs=0,
                                    ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], greedy, lora_request=lora,
                                use_tqdm=False)
            r["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
            r["logprobs"] = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                             for o in outs]
        if job.get("score"):
            score = SamplingParams(max_tokens=1, prompt_logprobs=0)
            outs = llm.generate([{"prompt_token_ids": s} for s in job["score"]], score, lora_request=lora,
                                use_tqdm=False)
            r["scored"] = [[lp[t].logprob for t, lp in zip(s[1:], o.prompt_logprobs[1:])]
                           for s, o in zip(job["score"], outs)]
        if job.get("decode"):
            n, prompt = job["decode"]["tokens"], job["decode"].get("prompt", [1, 2, 3, 4])
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            best = float("inf")
            for _ in range(job["decode"].get("repeats", 2)):
                t0 = time.perf_counter()
                llm.generate([{"prompt_token_ids": prompt}], params, lora_request=lora, use_tqdm=False)
                best = min(best, time.perf_counter() - t0)
            r["decode_tps"] = n / best
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    result = run(job)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
