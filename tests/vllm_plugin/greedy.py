"""vLLM's greedy tokens for checkpoints, one engine after another: ``python greedy.py SPEC_JSON``.

SPEC_JSON: {"paths": [...], "prompts": [[ids]], "n": new tokens, "llm_kwargs": {...}, "out": result file}; the result
file gets {path: [[tokens] per prompt], "logprobs:" + path: [[vLLM's log-probability of each chosen token] per
prompt], "capability": torch's CPU capability, "avx512": what torch.cpu reports of AVX512}. A separate process, so vLLM's engine processes end with it.
"""

import gc
import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    spec = json.loads(sys.argv[1])
    kwargs = {"dtype": "float32", "skip_tokenizer_init": True, "enforce_eager": True, "max_model_len": 128,
              "max_num_seqs": 4, "seed": 0, **spec["llm_kwargs"]}
    params = SamplingParams(temperature=0.0, max_tokens=spec["n"], ignore_eos=True, logprobs=0)
    results = {}
    for path in spec["paths"]:
        llm = LLM(path, **kwargs)
        outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
        results[path] = [list(o.outputs[0].token_ids) for o in outputs]
        results["logprobs:" + path] = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                       for o in outputs]
        del llm
        gc.collect()
    import torch

    results["capability"] = torch.backends.cpu.get_cpu_capability()
    results["avx512"] = torch.cpu._is_avx512_supported()
    with open(spec["out"], "w") as f:
        json.dump(results, f)
