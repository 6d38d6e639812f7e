"""Measuring a KV cache with the cache in the loop.

Protocol (`perplexity_with_cache`): tokenize the text as one string (no special tokens); cut it into
non-overlapping windows of ``context + continuation`` tokens from the start and keep the first ``windows``; per
batch of windows, prefill the first ``context`` tokens into a fresh cache, then feed the continuation one token at a
time through that cache; every continuation token is scored (the first from the prefill's last logits). Reported:
perplexity over the ``windows x continuation`` scored tokens, real cache bytes per cached token at the end, the
decode steps' wall time, and the top-1 (greedy) token at every scored step (for agreement with another cache).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..compat import cache_kwargs
from ..errors import ConfigError
from .base import bytes_per_token


@dataclass
class CacheLoopResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    context: int
    continuation: int
    bytes_per_token: float
    decode_seconds: float
    prefill_seconds: float
    greedy: list = field(default_factory=list, repr=False)

    def to_dict(self):
        d = asdict(self)
        d.pop("greedy")
        return d


def _cache_factory(model, cache) -> Callable[[], object]:
    if cache is None or cache == "dynamic":
        return lambda: DynamicCache(config=model.config)
    if callable(cache):
        return cache
    from .hook import make_cache

    return lambda: make_cache(model, cache)


@torch.no_grad()
def perplexity_with_cache(model, tokenizer, text: str | torch.Tensor, cache=None, *, context: int = 2048,
                          continuation: int = 256, windows: int = 4, batch_size: int = 4,
                          progress: bool = False) -> CacheLoopResult:
    """``cache``: None / "dynamic" (DynamicCache), a KV spec ("quant4", {"method": ...}) or a zero-argument factory
    returning a fresh cache."""
    if context < 1 or continuation < 1:
        raise ConfigError("context and continuation must be positive")
    if isinstance(text, torch.Tensor):
        ids = text.reshape(-1)
    else:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    span = context + continuation
    n = min(windows, ids.numel() // span)
    if n == 0:
        raise ConfigError(f"text has {ids.numel()} tokens, fewer than one window of {span}")
    data = ids[: n * span].view(n, span)
    make = _cache_factory(model, cache)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, count, t_dec, t_pre, bpt = 0.0, 0, 0.0, 0.0, []
    greedy = []
    try:
        for start in range(0, n, batch_size):
            batch = data[start:start + batch_size].to(device)
            cache_obj = make()
            t0 = time.perf_counter()
            out = model(input_ids=batch[:, :context], **cache_kwargs(model, cache_obj), use_cache=True, logits_to_keep=1)
            t_pre += time.perf_counter() - t0
            logits = out.logits[:, -1].float()
            steps = []
            for t in range(continuation):
                target = batch[:, context + t]
                total += F.cross_entropy(logits, target, reduction="sum").item()
                count += target.numel()
                steps.append(logits.argmax(-1).cpu())
                if t == continuation - 1:
                    break
                t0 = time.perf_counter()
                out = model(input_ids=target[:, None], **cache_kwargs(model, cache_obj), use_cache=True)
                t_dec += time.perf_counter() - t0
                logits = out.logits[:, -1].float()
            greedy.append(torch.stack(steps, dim=1))
            bpt.append(bytes_per_token(cache_obj))
            if progress:
                print(f"  windows {start + batch.shape[0]}/{n}: nll {total / count:.4f}", flush=True)
    finally:
        model.train(was_training)
    mean = total / count
    return CacheLoopResult(math.exp(mean), mean, count, n, context, continuation, sum(bpt) / len(bpt), t_dec, t_pre,
                           greedy=torch.cat(greedy).tolist())


def greedy_agreement(a: CacheLoopResult, b: CacheLoopResult) -> float:
    """Fraction of scored steps where both runs (same windows, teacher-forced) predict the same top-1 token."""
    x, y = torch.tensor(a.greedy), torch.tensor(b.greedy)
    if x.shape != y.shape:
        raise ValueError("runs over different windows")
    return float((x == y).float().mean())


NEEDLE_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@torch.no_grad()
def needle_retrieval(model, tokenizer, cache=None, *, lengths=(1024, 2048, 4096), depths=(0.1, 0.5, 0.9),
                     seed: int = 0, max_new_tokens: int = 8) -> dict:
    """Passkey retrieval: a 5-digit key hidden at ``depth`` of ``length`` tokens of filler; greedy answer after
    "What is the pass key? The pass key is". Returns {(length, depth): (found, answer)}."""
    make = _cache_factory(model, cache)
    g = torch.Generator().manual_seed(seed)
    filler = tokenizer(NEEDLE_FILLER, add_special_tokens=False)["input_ids"]
    results = {}
    device = next(p.device for p in model.parameters())
    for length in lengths:
        for depth in depths:
            key = str(int(torch.randint(10000, 99999, (1,), generator=g)))
            needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                               add_special_tokens=False)["input_ids"]
            question = tokenizer(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
            room = length - len(needle) - len(question)
            hay = (filler * (room // len(filler) + 1))[:room]
            cut = int(depth * room)
            ids = torch.tensor([hay[:cut] + needle + hay[cut:] + question], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, **cache_kwargs(model, make()), pad_token_id=tokenizer.eos_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            results[(length, depth)] = (key in answer, answer.strip())
    return results
