"""Helpers of the vLLM plugin tests: tiny checkpoints, transformers' reference, vLLM in a subprocess.

vLLM runs in a subprocess (`greedy.py`: one engine per checkpoint, in turn) so that its engine processes end with it;
transformers' greedy tokens for the same checkpoints are the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
#: two prompts of token ids (the tiny models have no tokenizer)
PROMPTS = [[5, 17, 33, 9, 100, 42, 77, 3], [7, 8, 9, 200, 31]]
NEW_TOKENS = 32
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def tiny_config(arch: str):
    """A tiny random decoder vLLM's CPU attention can run (head size 32)."""
    from transformers import LlamaConfig, Qwen2Config

    kwargs = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**kwargs)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def calibration_ids(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(0))


def save(model, path: Path) -> Path:
    import hf_compress

    hf_compress.save_pretrained(model, path)
    return path


def compressed(arch: str, config: dict, path: Path, calibrated: bool = False) -> Path:
    """A tiny random model compressed with ``config`` and saved to ``path``."""
    import hf_compress

    model = tiny_model(arch)
    hf_compress.compress(model, config, calibration=calibration_ids() if calibrated else None, progress=False)
    return save(model, path)


def hf_greedy(path: Path, prompts=PROMPTS, n: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy continuation (fp32, no cache) of each prompt from the checkpoint at ``path``."""
    import hf_compress  # noqa: F401  (registers the checkpoint format)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():  # argmax of a full forward per step: EOS is a token like any other, as with ignore_eos
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(n):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            out.append(ids[0, len(p):].tolist())
    return out


def hf_teacher_forced(path: Path, prompts, continuations) -> list[tuple[list[float], list[float]]]:
    """transformers' log-probabilities (fp32) along each given continuation: per prompt (logprob of each given token,
    logprob of transformers' own top choice at the same position), both teacher-forced on the continuation."""
    import hf_compress  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, continuations):
            lp = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].log_softmax(-1)
            out.append((lp.gather(1, torch.tensor(c)[:, None])[:, 0].tolist(), lp.max(-1).values.tolist()))
    return out


def vllm_run(paths: list[Path], prompts=PROMPTS, n: int = NEW_TOKENS, **llm_kwargs) -> subprocess.CompletedProcess:
    """Run `greedy.py` on the checkpoints; its JSON answer is in ``.result`` when it succeeded."""
    out = Path(paths[0]).parent / "vllm-greedy.json"
    spec = {"paths": [str(p) for p in paths], "prompts": prompts, "n": n, "llm_kwargs": llm_kwargs, "out": str(out)}
    proc = subprocess.run([sys.executable, str(HERE / "greedy.py"), json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, **VLLM_ENV}, stdin=subprocess.DEVNULL, timeout=900)
    proc.result = json.loads(out.read_text()) if proc.returncode == 0 else None
    return proc


def vllm_greedy(paths: list[Path], **kwargs) -> dict[str, list[list[int]]]:
    proc = vllm_run(paths, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc.result


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def assert_same_tokens(ours: list[list[int]], ref: list[list[int]], label: str) -> None:
    for i, (got, want) in enumerate(zip(ours, ref)):
        assert len(got) == len(want) == NEW_TOKENS, (label, i, len(got), len(want))
        at = first_divergence(got, want)
        assert at is None, f"{label}, prompt {i}: vLLM diverges from transformers at token {at}: {got} vs {want}"


def assert_agrees(path: Path, prompts, tokens, logprobs, tol: float, label: str) -> list[int | None]:
    """Greedy agreement with transformers, or logprobs within ``tol``: vLLM's greedy tokens equal transformers' for
    all `NEW_TOKENS`; where they diverge, along vLLM's whole continuation (teacher-forced in transformers) vLLM's
    log-probability of each token is within ``tol`` (nats) of transformers', and each token vLLM chose is within
    ``tol`` of transformers' best at that position (a near-tie the two engines' rounding split). Returns the first
    divergence per prompt (None: all tokens agree)."""
    ref = hf_greedy(path, prompts)
    at = [first_divergence(got, want) for got, want in zip(tokens, ref)]
    for i, (got, want) in enumerate(zip(tokens, ref)):
        assert len(got) == len(want) == NEW_TOKENS, (label, i, len(got), len(want))
    diverged = [i for i, a in enumerate(at) if a is not None]
    if diverged:
        forced = hf_teacher_forced(path, [prompts[i] for i in diverged], [tokens[i] for i in diverged])
        for i, (hf_lp, hf_top) in zip(diverged, forced):
            gap = max(abs(a - b) for a, b in zip(logprobs[i], hf_lp))
            behind = max(t - a for a, t in zip(hf_lp, hf_top))
            print(f"{label}, prompt {i}: first divergence at token {at[i]}; along vLLM's tokens max |logprob vLLM - "
                  f"transformers| = {gap:.4f}, vLLM's choice at most {behind:.4f} below transformers' best")
            assert gap <= tol and behind <= tol, (
                f"{label}, prompt {i}: vLLM diverges from transformers at token {at[i]} and its logprobs differ by "
                f"{gap:.4f} (choice {behind:.4f} below transformers' best), over {tol}: {tokens[i]} vs {ref[i]}")
    return at


def lowrank(linear, rank: int, bias: bool = True):
    """The rank-``rank`` truncated SVD of a dense `nn.Linear` as a `LowRankLinear` (with its bias, if it has one and
    ``bias``)."""
    from hf_compress import LowRankLinear

    u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    return LowRankLinear.from_factors((u[:, :rank] * s[:rank]).float(), vh[:rank].float(),
                                      linear.bias if bias else None)


def _variant(arch: str, config: dict):
    import hf_compress

    model = tiny_model(arch)
    hf_compress.compress(model, config, progress=False)
    return model


def mixed_model(arch: str):
    """Every layer type in one model, and merged layers whose parts differ in type and rank::

        layer 0: q low rank r24, k dense, v low rank r8 without the bias a Qwen2 v_proj has | o 2-bit g48 (partial last group) |
                 gate 3-bit hqq + float EoRA r8, up 8-bit + 4-bit packed EoRA r4 | down QuantLowRankLinear (4-bit)
        layer 1: q / k / v 4-bit g32 | o low rank r32 | gate low rank r16, up low rank r40 | down dense
    """
    from hf_compress.targets import set_module

    dense = tiny_model(arch)
    model = _variant(arch, {"method": "rtn", "bits": 4, "group_size": 32})
    donors = {
        "q2": _variant(arch, {"method": "rtn", "bits": 2, "group_size": 48}),
        "h3": _variant(arch, {"method": "hqq", "bits": 3, "group_size": 32, "eora_rank": 8}),
        "q8p": _variant(arch, {"method": "rtn", "bits": 8, "group_size": 64, "eora_rank": 4, "eora_factor_bits": 4,
                               "eora_factor_group_size": 32}),
        "lq": _variant(arch, {"method": "svd", "ratio": 0.3, "bits": 4, "group_size": 32}),
    }
    plan = {
        "model.layers.0.self_attn.q_proj": ("lowrank", 24), "model.layers.0.self_attn.k_proj": ("dense", None),
        "model.layers.0.self_attn.v_proj": ("lowrank-nobias", 8), "model.layers.0.self_attn.o_proj": ("q2", None),
        "model.layers.0.mlp.gate_proj": ("h3", None), "model.layers.0.mlp.up_proj": ("q8p", None),
        "model.layers.0.mlp.down_proj": ("lq", None), "model.layers.1.self_attn.o_proj": ("lowrank", 32),
        "model.layers.1.mlp.gate_proj": ("lowrank", 16), "model.layers.1.mlp.up_proj": ("lowrank", 40),
        "model.layers.1.mlp.down_proj": ("dense", None),
    }
    for name, (source, rank) in plan.items():
        if source.startswith("lowrank"):
            module = lowrank(dense.get_submodule(name), rank, bias=source == "lowrank")
        elif source == "dense":
            module = dense.get_submodule(name)
        else:
            module = donors[source].get_submodule(name)
        set_module(model, name, module)
    return model
