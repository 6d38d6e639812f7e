"""Perplexity, with one documented protocol used by the CLI, the benchmarks and model cards.

Protocol: tokenize the whole text as one string (no special tokens added); keep the first ``max_tokens``
tokens (default 32768); cut them into non-overlapping windows of ``seqlen`` tokens (default 512; a last
partial window is dropped); score each window independently (no context carried over); average the negative
log-likelihood over every predicted token (``seqlen - 1`` per window); report ``exp`` of that mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import device_of
from .compat import cache_kwargs
from .errors import ConfigError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int  # tokens scored (predicted)
    windows: int
    seqlen: int
    max_tokens: int

    def to_dict(self):
        return asdict(self)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, seqlen: int = 512, max_tokens: int = 32768, batch_size: int = 4,
               progress: bool = True) -> PerplexityResult:
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2, got {seqlen}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ConfigError(f"Text has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = device_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                  reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, n_windows, seqlen, max_tokens)


def decode_speed(model, input_ids: torch.Tensor, new_tokens: int = 64, repeats: int = 2, make_cache=None,
                 pad_token_id: int | None = None) -> tuple[float, float]:
    """(decode tokens/s, prefill seconds) of greedy ``generate`` from ``input_ids``, best of ``repeats``:
    prefill = t(1 new token), decode = (new_tokens - 1) / (t(new_tokens) - t(1)). ``make_cache()`` gives a fresh
    ``past_key_values`` for each call (a compressed KV cache; None: the default cache). One short warm-up call
    runs first (kernels that prepare themselves on their first forward do it there)."""
    import time

    if new_tokens < 2:
        raise ConfigError(f"new_tokens must be >= 2 to time decoding, got {new_tokens}")

    def run(n: int) -> float:
        kw = cache_kwargs(model, make_cache()) if make_cache else {}
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id, **kw)
        if out.shape[1] != input_ids.shape[1] + n:
            raise RuntimeError(f"generate returned {out.shape[1] - input_ids.shape[1]} tokens, asked for {n}")
        return time.perf_counter() - start

    run(2)
    t1 = min(run(1) for _ in range(repeats))
    tn = min(run(new_tokens) for _ in range(repeats))
    return (new_tokens - 1) / (tn - t1), t1
