"""CPU decode speed of compressed SmolLM2-135M checkpoints (issue 16): one command, one table, one run.

    .venv/bin/python benchmarks/decode.py                          # every row (~25 min on 2 cores)
    .venv/bin/python benchmarks/decode.py --rows "dense fp32" "rtn 4-bit g128"
    .venv/bin/python benchmarks/decode.py --rounds 3                # each row 3 times, round-robin, best kept
    .venv/bin/python benchmarks/decode.py --emulate-avx2 --rows "dense fp32" "rtn 4-bit g32" \
        "llama.cpp: rtn 4-bit g32 as GGUF Q4_1"                     # torch / oneDNN / MKL held to AVX2

Protocol: 2 threads (``--threads``), ``generate`` batch 1, greedy, a 256-token prompt (the start of WikiText-2 raw
test), 64 new tokens, best of two (`hf_compress.evaluation.decode_speed`): ``decode tok/s`` = 63 / (t(64 new tokens)
- t(1 new token)); ``prefill ms`` = t(1 new token) (the prompt's forward plus one step). Every checkpoint is built
first (``common.build_checkpoint``: ``hf_compress.compress`` + ``save_pretrained``, the same as ``hf-compress
compress``; kept in ``--workdir`` and reused) and then each row loads its
checkpoint with ``AutoModelForCausalLM.from_pretrained`` in its own process, so ``peak RSS`` (VmHWM of that process:
imports + load + generate) is the row's own; ``RSS over imports`` is that peak less the process's peak after its
imports (what loading and running the model added); ``ckpt MB`` is the checkpoint directory's safetensors. The KV rows
use the dense fp32 model with a 2048-token prompt and compare with ``DynamicCache`` at the same context.

Rows: dense fp32 and bf16; llama.cpp (llama-cpp-python, built from source) on our rtn 4-bit g32 checkpoint exported
to GGUF (exact Q4_1), beside the same checkpoint on our CPU path; the peer, torchao's int4 weight-only CPU path (``PrototypeInt4WeightOnlyConfig``,
``_weight_int4pack_mm_for_cpu``; bf16 model: it needs bf16 activations) on the same 210 projections at g64
(torchao needs in_features % group == 0; SmolLM2's 576-wide inputs rule out g128); ours at 2/3/4/8 bits (4-bit
also with the tied ``lm_head`` compressed: ``+ lm_head``, which unties it from the embedding), 3-bit + EoRA r32
(calibrated on 16 x 512 tokens of gutenberg-pg1342.txt), ``svd`` 0.4, and the KV caches. Ours run with
``HF_COMPRESS_KERNELS=auto`` (the CPU int4 kernels: `hf_compress.kernels.cpu.weights`); add ``--kernels torch`` to time
the reference instead.

MoE rows (``MoE top-2: ...``): SmolLM2 as a top-2 mixture of 8 experts (`moe_model.moe_from_dense`, built once
into ``--workdir`` by ``common.build_checkpoint``), dense fp32 / bf16 and with its q/k/v/o and experts compressed
(the router dense; ``+ lm_head``: the tied head too; ``bound: ...``: the dense fp32 MoE with q/k/v/o and the experts
modules returning zeros, as the ``bound`` row below). The dense MoE runs transformers' ``eager`` experts (a loop over
the routed experts, as ours); ``, grouped_mm`` rows run transformers' default for the model, ``grouped_mm``
(``torch.nn.functional.grouped_mm``). Their ``x dense fp32`` / ``x dense bf16`` / ``prefill x dense fp32`` are
against the dense MoE's ``eager`` rows, not dense SmolLM2's. Where their time goes: ``benchmarks/moe.py split``.
``30B-A3B shape, 2 blocks: ...`` rows: two blocks at Qwen3-30B-A3B's shape (hidden 2048, 128 experts of 768 neurons,
top-8, 32 / 4 heads of 128; random weights, vocabulary 2048: `moe_scale.build`; the prompt's ids modulo the
vocabulary), dense (``eager`` experts) and with q/k/v/o and every expert at rtn 4-bit g128: expert layers of real
size, where the per-token weight bytes rather than the per-call costs set the speed; compared with their own dense
rows.

One more row is a bound, not a model: ``bound: projections free (fp32)`` is the dense fp32 model with its 210
projections replaced by a module that returns zeros of the right shape (one fill, no product: uninitialised memory
could hold denormals or NaNs, which run slower through the rest). Its tokens/s is what any kernel for those layers
could at most reach on this machine with the rest of the model as it is (attention, norms, rotary, the fp32 tied
``lm_head``, ``generate``'s own work); its ``x dense fp32`` is the ceiling of the fp32-model rows' ratio.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import DATA, SHAPE_MODEL, TARGETS, checkpoint_slug, ensure_checkpoints, peak_rss_mb, print_table, run_rows

PROMPT, NEW, KV_CONTEXT = 256, 64, 2048
#: the MoE rows' model: SmolLM2 as 8 experts, top-2 (benchmarks/moe_model.py), and their label prefix
MOE_MODEL, MOE = "moe8-top2", "MoE top-2:"
#: rows on Qwen3-30B-A3B's block shape (`common.SHAPE_MODEL`: 2 blocks of random weights) and their label prefix
SHAPE = "30B-A3B shape, 2 blocks:"

#: label -> how the row is built ("dense" / "torchao" / an hf-compress config) and run (dtype, KV spec, context)
ROWS = {
    "dense fp32": {"build": "dense", "dtype": "float32"},
    "dense bf16": {"build": "dense", "dtype": "bfloat16"},
    "torchao int4 g64 (bf16 model)": {"build": "dense", "dtype": "bfloat16", "peer": 64},
    "bound: projections free (fp32)": {"build": "dense", "dtype": "float32", "free": True},
    "rtn 4-bit g128": {"build": {"method": "rtn", "bits": 4, "group_size": 128}},
    "rtn 4-bit g64": {"build": {"method": "rtn", "bits": 4, "group_size": 64}},
    "rtn 4-bit g32": {"build": {"method": "rtn", "bits": 4, "group_size": 32}},
    "llama.cpp: rtn 4-bit g32 as GGUF Q4_1": {"build": {"method": "rtn", "bits": 4, "group_size": 32},
                                              "engine": "llama.cpp"},
    "rtn 4-bit g128 (bf16 model)": {"build": {"method": "rtn", "bits": 4, "group_size": 128}, "dtype": "bfloat16"},
    "rtn 4-bit g128 + lm_head": {"build": {"method": "rtn", "bits": 4, "group_size": 128, "lm_head": True}},
    "rtn 4-bit g128 + lm_head (bf16 model)": {"build": {"method": "rtn", "bits": 4, "group_size": 128, "lm_head": True},
                                              "dtype": "bfloat16"},
    "hqq 3-bit g64": {"build": {"method": "hqq", "bits": 3, "group_size": 64}},
    "hqq 2-bit g32": {"build": {"method": "hqq", "bits": 2, "group_size": 32}},
    "rtn 8-bit g128": {"build": {"method": "rtn", "bits": 8, "group_size": 128}},
    "hqq 3-bit g64 + EoRA r32": {"build": {"method": "hqq", "bits": 3, "group_size": 64, "eora_rank": 32}},
    "svd 0.4": {"build": {"method": "svd", "ratio": 0.4}},
    MOE + " dense fp32": {"build": {"model": MOE_MODEL}, "dtype": "float32", "experts": "eager"},
    MOE + " dense bf16": {"build": {"model": MOE_MODEL}, "dtype": "bfloat16", "experts": "eager"},
    MOE + " dense fp32, grouped_mm": {"build": {"model": MOE_MODEL}, "dtype": "float32"},
    MOE + " dense bf16, grouped_mm": {"build": {"model": MOE_MODEL}, "dtype": "bfloat16"},
    MOE + " rtn 4-bit g64": {"build": {"model": MOE_MODEL, "method": "rtn", "bits": 4, "group_size": 64}},
    MOE + " rtn 4-bit g64 (bf16 model)": {"build": {"model": MOE_MODEL, "method": "rtn", "bits": 4, "group_size": 64},
                                         "dtype": "bfloat16"},
    MOE + " rtn 3-bit g64": {"build": {"model": MOE_MODEL, "method": "rtn", "bits": 3, "group_size": 64}},
    MOE + " rtn 4-bit g64 + lm_head": {"build": {"model": MOE_MODEL, "method": "rtn", "bits": 4, "group_size": 64,
                                                 "lm_head": True}},
    MOE + " bound: projections and experts free (fp32)": {"build": {"model": MOE_MODEL}, "dtype": "float32",
                                                           "experts": "eager", "free": True},
    SHAPE + " dense fp32": {"build": {"model": SHAPE_MODEL}, "dtype": "float32", "experts": "eager"},
    SHAPE + " dense bf16": {"build": {"model": SHAPE_MODEL}, "dtype": "bfloat16", "experts": "eager"},
    SHAPE + " rtn 4-bit g128": {"build": {"model": SHAPE_MODEL, "method": "rtn", "bits": 4, "group_size": 128}},
    "KV: DynamicCache, 2048 ctx": {"build": "dense", "context": KV_CONTEXT},
    "KV: quant4, 2048 ctx": {"build": "dense", "context": KV_CONTEXT, "kv": "quant4"},
    "KV: quant4 dense_copy, 2048 ctx": {"build": "dense", "context": KV_CONTEXT,
                                        "kv": {"method": "quant", "bits": 4, "dense_copy": True}},
    "KV: quantmix, 2048 ctx": {"build": "dense", "context": KV_CONTEXT, "kv": "quantmix"},
    "KV: quantmix dense_copy, 2048 ctx": {"build": "dense", "context": KV_CONTEXT,
                                          "kv": {"method": "quant", "bits": 4, "value_bits": 3, "residual": 16,
                                                 "group_size": 128, "value_flush": 1, "dense_copy": True}},
}


def _prompt_ids(tok, n: int):
    text = (DATA / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")[:200_000]
    return tok(text, return_tensors="pt").input_ids[:, :n]


def _is_projection(module, name: str) -> bool:
    """The layers the peer and the bound row act on: the ``nn.Linear`` projections named in ``TARGETS``."""
    import torch

    return isinstance(module, torch.nn.Linear) and name.split(".")[-1] in TARGETS


def _free_projections(model) -> None:
    """The bound rows: every projection in ``TARGETS`` becomes a module returning zeros [..., out], and so does every
    fused experts module of a MoE (zeros [tokens, hidden]; the router still runs)."""
    import torch

    from hf_compress.modules.experts import is_fused_experts

    class Free(torch.nn.Module):
        def __init__(self, out_features: int | None):
            super().__init__()
            self.out_features = out_features

        def forward(self, x, *routing):
            return x.new_zeros(*x.shape[:-1], self.out_features or x.shape[-1])

    names = [name for name, m in model.named_modules() if _is_projection(m, name)]
    if not names:
        raise RuntimeError(f"no projection named {TARGETS} to replace")
    for name in names:
        model.set_submodule(name, Free(model.get_submodule(name).out_features))
    for name in [name for name, m in model.named_modules() if is_fused_experts(m)]:
        model.set_submodule(name, Free(None))


def run_llamacpp_row(label: str, ckpt: Path) -> dict:
    """The peer CPU engine on the same weights: the checkpoint exported to GGUF (every projection exact Q4_1,
    `hf_compress.export_gguf`) and run by llama.cpp (llama-cpp-python), fed our tokenizer's ids; the same protocol
    (prefill = the prompt's evaluation plus one step, decode = 63 greedy steps after it, best of 2)."""
    import time

    import llama_cpp
    import numpy as np
    from transformers import AutoTokenizer

    threads = int(os.environ.get("DECODE_THREADS", "2"))
    gguf = ckpt.with_suffix(".gguf")
    if not gguf.exists():
        import hf_compress  # noqa: F401
        from hf_compress.export import export

        export(ckpt, gguf, format="gguf")
    imports_mb = peak_rss_mb()
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = [int(t) for t in _prompt_ids(tok, PROMPT)[0]]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=PROMPT + NEW + 8, n_threads=threads, n_threads_batch=threads,
                          n_batch=PROMPT + NEW + 8, logits_all=False, verbose=False)  # scores: one row per batch slot
    best_prefill, best_tps = float("inf"), 0.0
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        t1 = time.perf_counter()
        for _ in range(NEW - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        best_prefill = min(best_prefill, t1 - t0)
        best_tps = max(best_tps, (NEW - 1) / (time.perf_counter() - t1))
    return {"row": label, "decode tok/s": round(best_tps, 2), "prefill ms": round(1000 * best_prefill),
            "context": len(ids), "peak RSS MB": round(peak_rss_mb()),
            "RSS over imports MB": round(peak_rss_mb() - imports_mb), "ckpt MB": round(gguf.stat().st_size / 1e6, 1)}


def run_row(label: str, spec: dict, ckpt: Path) -> dict:
    if spec.get("engine") == "llama.cpp":
        return run_llamacpp_row(label, ckpt)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_compress  # noqa: F401  (registers the hf_compress checkpoint format with from_pretrained)
    from hf_compress.evaluation import decode_speed

    torch.set_num_threads(int(os.environ.get("DECODE_THREADS", "2")))
    imports_mb = peak_rss_mb()  # torch, transformers (which imports torchao when installed), hf_compress
    dtype = getattr(torch, spec.get("dtype", "float32"))
    kw = {"experts_implementation": spec["experts"]} if spec.get("experts") else {}
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, **kw).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    if spec.get("peer"):
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=spec["peer"]),
                  filter_fn=_is_projection)
    if spec.get("free"):
        _free_projections(model)
    ids = _prompt_ids(tok, spec.get("context", PROMPT)) % model.config.vocab_size  # (the shape rows: a small vocab)
    make_cache = None
    if spec.get("kv"):
        from hf_compress.kv.registry import kv_method, parse_kv_spec

        kv = parse_kv_spec(spec["kv"])
        make_cache = lambda: kv_method(kv).make_cache(model, kv)  # noqa: E731
    tok_s, prefill_s = decode_speed(model, ids, NEW, repeats=2, make_cache=make_cache, pad_token_id=tok.eos_token_id)
    files = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))
    return {"row": label, "decode tok/s": round(tok_s, 2), "prefill ms": round(1000 * prefill_s),
            "context": ids.shape[1], "peak RSS MB": round(peak_rss_mb()),
            "RSS over imports MB": round(peak_rss_mb() - imports_mb), "ckpt MB": round(files / 1e6, 1)}


def _best_of_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per label from several rounds of the same rows: the round with the most decode tokens/s, with the
    least prefill time and the most peak RSS of all rounds (rows that failed in every round keep their error)."""
    merged: dict[str, dict] = {}
    for results in rounds:
        for r in results:
            key = r.get("row", r.get("label"))
            old = merged.get(key)
            if old is None or "decode tok/s" not in old:
                merged[key] = dict(r)
            elif "decode tok/s" in r:
                best = dict(r if r["decode tok/s"] > old["decode tok/s"] else old)
                best["prefill ms"] = min(r["prefill ms"], old["prefill ms"])
                for k in ("peak RSS MB", "RSS over imports MB"):
                    best[k] = max(r[k], old[k])
                merged[key] = best
    return list(merged.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--workdir", default="/tmp/hf-compress-decode", help="where the checkpoints are built (reused)")
    ap.add_argument("--kernels", default="auto", help="HF_COMPRESS_KERNELS for our rows (auto: the CPU kernels)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per row (default 2, the protocol's)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every row this many times, round-robin, and keep each row's best decode (its prefill: "
                         "the least, its RSS: the most): a machine whose speed drifts over minutes then favours no row")
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="run torch, oneDNN and MKL at AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, "
                         "MKL_ENABLE_INSTRUCTIONS=AVX2): a CPU without AVX512 or native bf16, on one that has them "
                         "(llama.cpp rows keep the ISA llama-cpp-python was built for)")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.row:  # child: time one row
        spec = ROWS[args.row]
        print("ROW " + json.dumps(run_row(args.row, spec, work / checkpoint_slug(spec["build"]))), flush=True)
        return
    if args.emulate_avx2:
        os.environ.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    os.environ["HF_COMPRESS_KERNELS"] = args.kernels
    os.environ["DECODE_THREADS"] = str(args.threads)
    ensure_checkpoints([ROWS[label]["build"] for label in args.rows], work)
    jobs = [(label, [label, "--workdir", str(work)]) for label in args.rows]
    results = _best_of_rounds([run_rows(__file__, jobs) for _ in range(args.rounds)])
    by = {r["row"]: r for r in results if "row" in r}
    for r in results:
        # MoE rows are compared with their dense MoE's, the others with dense SmolLM2's
        moe = next((p for p in (MOE, SHAPE) if r.get("row", "").startswith(p)), None)
        for base in ("dense fp32", "dense bf16"):
            ref = by.get(f"{moe} {base}" if moe else base)
            if ref and "decode tok/s" in r and r.get("context") == ref["context"]:
                r[f"x {base}"] = round(r["decode tok/s"] / ref["decode tok/s"], 2)
                if base == "dense fp32":
                    r["prefill x dense fp32"] = round(r["prefill ms"] / ref["prefill ms"], 2)
        if moe:
            continue
        cpp = by.get("llama.cpp: rtn 4-bit g32 as GGUF Q4_1")
        if cpp and "decode tok/s" in r and r.get("context") == cpp["context"]:
            r["x llama.cpp"] = round(r["decode tok/s"] / cpp["decode tok/s"], 2)
            r["prefill x llama.cpp"] = round(r["prefill ms"] / cpp["prefill ms"], 2)
        peer = by.get("torchao int4 g64 (bf16 model)")
        if peer and "decode tok/s" in r and r.get("context") == peer["context"]:
            r["x torchao"] = round(r["decode tok/s"] / peer["decode tok/s"], 2)
        if r.get("context") == KV_CONTEXT and "KV: DynamicCache, 2048 ctx" in by and "decode tok/s" in r:
            r["x DynamicCache (time/token)"] = round(by["KV: DynamicCache, 2048 ctx"]["decode tok/s"]
                                                     / r["decode tok/s"], 2)
    rounds = f" in each of {args.rounds} rounds (the best round per row)" if args.rounds > 1 else ""
    print_table(results, ["row", "decode tok/s", "x dense fp32", "x dense bf16", "x torchao", "x llama.cpp",
                          "x DynamicCache (time/token)", "prefill ms", "prefill x dense fp32", "prefill x llama.cpp",
                          "context", "peak RSS MB", "RSS over imports MB", "ckpt MB"],
                title=f"\nSmolLM2-135M (MoE rows: the MoE model each names), {args.threads} threads, batch 1, greedy, "
                      f"{NEW} new tokens, best of 2{rounds}, "
                      f"HF_COMPRESS_KERNELS={args.kernels}")


if __name__ == "__main__":
    main()
