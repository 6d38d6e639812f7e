"""One peer row of benchmarks/peers.py, run by the interpreter of that peer's own virtual environment (it imports
neither hf_compress nor the other benchmarks): ``peers_worker.py '<json spec>'`` loads the protocol's SmolLM2 fp32
checkpoint, compresses it with the peer library on the given calibration windows, saves the library's checkpoint,
counts its stored bits per weight, scores the perplexity on the given WikiText-2 token ids (512-token windows, the
same computation as `hf_compress.evaluation.perplexity`) and prints one ``ROW {json}`` line."""

from __future__ import annotations

import json
import math
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F


def perplexity(model, ids: torch.Tensor, seqlen: int = 512, batch_size: int = 4) -> float:
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits.float()
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def stored_bits(folder: Path, targets: list[str]) -> tuple[int, int]:
    """(bits stored for the target layers, their number of weights) from a saved checkpoint: every tensor of a
    target layer but its bias (packed codes, scales, zero points, group indices, shapes)."""
    from safetensors import safe_open

    bits, weights = 0, 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                layer, _, tensor = key.rpartition(".")
                if layer.split(".")[-1] not in targets or tensor == "bias":
                    continue
                t = f.get_tensor(key)
                bits += t.numel() * t.element_size() * 8
                if tensor == "weight_shape":
                    weights += int(t[0]) * int(t[1])
                elif tensor in ("weight", "qweight") and t.is_floating_point():
                    weights += t.numel()
    return bits, weights


def llm_compressor(model, tok, calib: torch.Tensor, spec: dict):
    from datasets import Dataset
    from llmcompressor import oneshot

    weights = {"num_bits": spec["bits"], "type": "int", "symmetric": False, "strategy": "group",
               "group_size": spec["group_size"]}
    targets = [f"re:.*\\.{t}$" for t in spec["targets"]]
    if spec["peer"] == "llmc-gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups={"group_0": {"targets": targets, "weights": {**weights, "actorder": "weight"}}},
                              ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        if not torch.cuda.is_available():
            # llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, which fails
            # without a CUDA driver ("Found no NVIDIA driver"); pinning only speeds up copies, so skip it on CPU
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

        recipe = AWQModifier(config_groups={"group_0": {"targets": targets, "weights": weights}}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.time()
    oneshot(model=model, processor=tok, dataset=data, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)
    seconds = time.time() - t0
    out = Path(spec["out"])
    model.save_pretrained(out, save_compressed=True)
    return model, seconds, out, f"llmcompressor {metadata.version('llmcompressor')}"


def auto_round(model, tok, calib: torch.Tensor, spec: dict):
    from auto_round import AutoRound

    layers = {n: {"bits": spec["bits"], "group_size": spec["group_size"], "sym": False}
              for n, m in model.named_modules() if n.split(".")[-1] in spec["targets"]}
    t0 = time.time()
    rounder = AutoRound(model, tok, bits=spec["bits"], group_size=spec["group_size"], sym=False,
                        dataset=[{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in calib],
                        nsamples=calib.shape[0], seqlen=calib.shape[1], iters=spec["iters"], layer_config=layers,
                        device_map="cpu")
    rounder.quantize()
    seconds = time.time() - t0
    out = Path(spec["out"])
    rounder.save_quantized(str(out), format="auto_round")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return model, seconds, out, f"auto-round {metadata.version('auto-round')}"


def main():
    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    calib = torch.load(spec["calib"])
    run = llm_compressor if spec["peer"].startswith("llmc") else auto_round
    model, seconds, out, version = run(model, tok, calib, spec)
    bits, weights = stored_bits(out, spec["targets"])
    row = {"method": spec["method"], "bits": spec["bits"], "group_size": spec["group_size"],
           "bits_w": round(bits / weights, 3) if weights else None, "compress_s": round(seconds, 1),
           "versions": f"{version}, transformers {metadata.version('transformers')}, torch {torch.__version__}"}
    t0 = time.time()
    row["ppl_wikitext"] = perplexity(model, torch.load(spec["eval"]))
    row["eval_s"] = round(time.time() - t0, 1)
    print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
