"""The perplexity protocol against a direct per-window computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_compress import ConfigError, perplexity

from conftest import make_tiny


def test_matches_manual_windows(tiny_tokenizer):
    model = make_tiny("llama")
    text = "To be, or not to be, that is the question. " * 40
    res = perplexity(model, tiny_tokenizer, text, seqlen=32, max_tokens=200, batch_size=2, progress=False)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"][:200]
    n = len(ids) // 32
    assert res.windows == n == 6 and res.tokens == n * 31
    total = 0.0
    for w in range(n):
        window = torch.tensor(ids[w * 32 : (w + 1) * 32])[None]
        with torch.no_grad():
            logits = model(input_ids=window).logits[0]
        total += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
    assert res.perplexity == pytest.approx(math.exp(total / (n * 31)), rel=1e-5)


def test_text_shorter_than_one_window(tiny_tokenizer):
    with pytest.raises(ConfigError, match="fewer than one window"):
        perplexity(make_tiny("llama"), tiny_tokenizer, "too short", seqlen=512, progress=False)
