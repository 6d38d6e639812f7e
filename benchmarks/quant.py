"""Weight quantization on SmolLM2-135M: one command, one table, one run.

    .venv/bin/python benchmarks/quant.py                 # every row below (several hours on 2 cores)
    .venv/bin/python benchmarks/quant.py --settings 3:64 --methods hqq gptq --eora 0 32 --peers hqq
    .venv/bin/python benchmarks/quant.py --rows dense gptq:3:64:32 hqq-package:3:64 quanto:4:128   # explicit rows

Row ``METHOD:BITS:GROUP:bX`` (e.g. ``gptq:3:64:b0.5``) gives EoRA per-layer ranks from a budget of X extra bits
per weight (``eora_bits``); ``METHOD:BITS:GROUP:R1/R2/...`` compresses once at the largest rank and scores each rank
by truncating the factors (identical to compressing at that rank: the factors are SVD-ordered and, when quantized,
quantized row by row); a trailing ``:qB`` stores the EoRA factors as B-bit codes (``eora_factor_bits``, group 128),
e.g. ``gptq:3:64:32/20/16:q4``. ``METHOD:avgX:GROUP`` (e.g. ``gptq:avg3.0:64``) quantizes with a width per layer
from 2/3/4/8 under a budget of X bits per weight as stored (``avg_bits``: codes, scales and zeros; calibrated);
``GROUP`` may list group sizes (``group_choices``, e.g. ``gptq+act:avg3.0:64/192/576/1536``) and a trailing ``:wB1/B2``
restricts the widths (``bit_choices``, e.g. ``:w2/3/4``). ``bits_w_fp16_factors`` is what the same layers take with the EoRA factors stored in
fp16/bf16, as in a half-precision checkpoint (the benchmark model is fp32, so its factors are fp32 in ``bits_w``).
``--extra-eval FILE`` adds the perplexity on another text of ../shared/data (its first ``--extra-eval-tokens``,
default 16384). A method name may carry modifiers: ``+rot`` rotates the residual stream first
(``rotate="hadamard"``; ``+orth``: ``rotate="orthogonal"``; ``+rot2``: also the attention heads,
``rotate_heads=True``), ``+act`` makes the grid activation-aware (rtn/gptq ``grid="mse-act"``, hqq
``act_weighted=True``; calibrated), ``+lr`` learns the rounding and clipping block by block (rtn/gptq
``learn_rounding``, options from ``--learn-rounding JSON``; calibrated), ``+ms`` weighs an ``avgX`` row's layers by
measured sensitivity (``bits_sensitivity="measured"``), ``+awq`` folds activation-aware channel scales into each block
before it is quantized (``channel_scales="awq"``; calibrated), e.g. ``gptq+rot+act:3:64``, ``gptq+lr:3:64``; ``dense+rot`` is the rotated dense model (it must score
the dense perplexity). ``other_params_M`` counts the parameters outside the quantized layers (embedding, head, norms;
a tied matrix once): a rotation unties SmolLM2's tied head, which adds one 49152 x 576 matrix there.

Rows: dense; for each bits:group setting (default 4:128 3:64 2:32) each of our methods (rtn, hqq, gptq) with each
EoRA rank (default 0 16 32 64); the peers measured in the same run: the HQQ package (CPU, torch backend, its
defaults) and optimum-quanto (qint4 only: quanto has no 3- or 2-bit weights; its group size is its default 128,
which it lowers to a divisor of the input dimension where 128 does not divide it).

Protocol (../shared/PEERS.md): perplexity on the first 32768 tokens of WikiText-2 raw test in 512-token windows;
calibration (gptq, and EoRA on any quantizer) 32 x 512 tokens of gutenberg-pg1342.txt, seed 0; every
q/k/v/o/gate/up/down projection is quantized. ``bits_w`` counts the real tensors of the quantized layers (codes,
scales, zeros, EoRA factors; biases excluded; SmolLM2 has none) per weight. The SmolLM2 weights come from a Q4_1
GGUF (4-bit grid, blocks of 32), so 4-bit rows flatter every method; the 3- and 2-bit rows are the meaningful ones.
Our rows are scored after ``model.dequantize()`` (the same fp32 weights dequant(Q) + U·V the packed layers compute
with; it saves unpacking the codes for each of the 64 windows on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time

from common import DATA, TARGETS, peak_rss_mb, print_table, reset_peak_rss, run_rows


def _tensor_bits(module) -> int:
    """Bits of every tensor a (peer) quantized module holds, however it stores them: tensor subclasses (quanto's
    packed weights, also when wrapped as a Parameter) are opened with ``__tensor_flatten__`` down to plain tensors;
    HQQ keeps scale/zero in a ``meta`` dict."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            return
        seen.add(id(t))
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
        else:
            total += t.numel() * t.element_size() * 8

    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        add(t)
    for v in getattr(module, "meta", {}).values():
        add(v)
    return total


def run_row(spec: dict) -> list[dict]:
    import torch

    import hf_compress
    from hf_compress.loading import load_model, smollm2_gguf_path

    torch.manual_seed(0)
    model, tok = load_model(smollm2_gguf_path())
    row = {k: v for k, v in spec.items()
           if k not in ("rotate", "rotate_heads", "act", "lr", "ms", "awq", "extra_eval", "extra_eval_tokens",
                         "method_kwargs")}
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    n_weights = sum(model.get_submodule(n).weight.numel() for n in names)
    reset_peak_rss()
    t0 = time.time()
    kind = spec["kind"]
    if kind == "ours":
        eora = spec["eora"]
        budget = isinstance(eora, str)  # "b0.5": EoRA ranks from a budget of 0.5 extra bits per weight
        sweep = sorted(eora, reverse=True) if isinstance(eora, list) else [None]  # one compression, several ranks
        act = spec.get("act", False)
        mixed = isinstance(spec["bits"], str)  # "avg3.0": per-layer widths under 3.0 stored bits per weight
        cfg = {"method": spec["method"], "group_size": spec["group_size"],
               **({"avg_bits": float(spec["bits"][3:]), "bit_choices": spec.get("bit_choices"),
                   "group_choices": spec.get("group_choices"),
                   "bits_sensitivity": "measured" if spec.get("ms") else "gradient"} if mixed else {"bits": spec["bits"]}),
               "eora_rank": sweep[0] if sweep[0] else (None if budget else (eora or None)),
               "eora_bits": float(eora[1:]) if budget else None, "eora_factor_bits": spec.get("factor_bits"),
               "targets": TARGETS, "calibration": {"nsamples": spec["nsamples"], "seqlen": 512, "seed": 0},
               "rotate": spec.get("rotate"), "rotate_heads": spec.get("rotate_heads", False),
               "method_kwargs": {**(({"act_weighted": True} if spec["method"] == "hqq" else {"grid": "mse-act"}) if act else {}),
                                 **spec.get("method_kwargs", {})},
               "learn_rounding": spec.get("lr"), "channel_scales": "awq" if spec.get("awq") else None}
        row["method"] = _label(spec)
        calibrated = spec["method"] == "gptq" or eora or act or spec.get("lr") or mixed or spec.get("awq")
        learned = _LearnedLog()
        seq_log = logging.getLogger("hf_compress.pipelines.sequential")
        seq_log.setLevel(logging.INFO)
        seq_log.addHandler(learned)
        hf_compress.compress(model, cfg, calibration=str(DATA / spec["calib"]) if calibrated else None,
                             tokenizer=tok, progress=False)
        if learned.summary:  # the pipeline's closing line: blocks whose learned codes were kept, seconds spent
            kept, total, seconds = learned.summary
            row["lr_kept"], row["lr_s"] = f"{kept}/{total}", round(seconds, 1)
        row["compress_s"] = round(time.time() - t0, 1)
        row["compress_peak_rss_MB"] = round(peak_rss_mb())
        if mixed:  # how many layers got each width
            widths = [model.get_submodule(n).bits for n in names]
            row["widths"] = " ".join(f"{b}b:{widths.count(b)}" for b in sorted(set(widths)))
            formats = [(model.get_submodule(n).bits, model.get_submodule(n).group_size) for n in names]
            if len({g for _, g in formats}) > 1:  # group_choices: how many layers got each (width, group size)
                row["widths"] = " ".join(f"{b}b/g{g}:{formats.count((b, g))}" for b, g in sorted(set(formats)))
        rows = []
        for rank in sweep:  # EoRA factors are SVD-ordered and quantized row by row: truncating = compressing at rank
            if rank is not None:
                for n in names:
                    layer = model.get_submodule(n)
                    layer.truncate_rank(min(rank, layer.rank))
            rows.append(_score({**row, "eora": rank if rank is not None else eora, **_our_bits(model, names, n_weights),
                                "other_params_M": _other_params_m(model, names)},
                               spec, model, tok, copy=len(sweep) > 1))
        return rows
    if kind == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        qcfg = BaseQuantizeConfig(nbits=spec["bits"], group_size=spec["group_size"])
        bits = 0
        for n in names:
            parent, child = n.rsplit(".", 1)
            q = HQQLinear(model.get_submodule(n), qcfg, compute_dtype=torch.float32, device="cpu")
            setattr(model.get_submodule(parent), child, q)
            bits += _tensor_bits(q)
    elif kind == "quanto":
        import optimum.quanto as oq

        oq.quantize(model, weights=oq.qint4, exclude=["lm_head"])
        oq.freeze(model)
        bits = sum(_tensor_bits(model.get_submodule(n)) for n in names)
    else:
        if spec.get("rotate"):
            from hf_compress.transforms import rotate_residual

            rotate_residual(model, spec["rotate"], heads=spec.get("rotate_heads", False))
            row["method"] = _label(spec)
        bits = 32 * n_weights
    row["other_params_M"] = _other_params_m(model, names)
    row["compress_s"] = round(time.time() - t0, 1)
    row["compress_peak_rss_MB"] = round(peak_rss_mb())
    row["bits_w"] = round(bits / n_weights, 3)
    row["proj_MB"] = round(bits / 8 / 1e6, 1)
    return [_score(row, spec, model, tok)]


class _LearnedLog(logging.Handler):
    """Catches the calibrated pipeline's learned-rounding summary line (blocks kept, total, seconds)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.summary = None

    def emit(self, record):
        if record.msg.startswith("learned rounding: kept"):
            self.summary = record.args


def _label(spec: dict) -> str:
    """The row's method with its transform and grid."""
    label = spec["method"]
    if spec.get("rotate"):
        label += f" + rotate {spec['rotate']}" + (" + heads" if spec.get("rotate_heads") else "")
    if spec.get("act"):
        label += " + act-weighted" if spec["method"] == "hqq" else " + grid mse-act"
    if spec.get("awq"):
        label += " + awq scales"
    if spec.get("ms"):
        label += " + measured sensitivity"
    if spec.get("lr"):
        label += " + learned rounding " + json.dumps(spec["lr"], separators=(",", ":"))
    if spec.get("method_kwargs"):
        label += " " + json.dumps(spec["method_kwargs"], separators=(",", ":"))
    return label


def _other_params_m(model, names) -> float:
    """Millions of parameters outside the quantized layers, each tensor once (a tied embedding/head counts once)."""
    inside = {id(p) for n in names for p in model.get_submodule(n).parameters()}
    seen = {id(p): p.numel() for p in model.parameters() if id(p) not in inside}
    return round(sum(seen.values()) / 1e6, 2)


def _our_bits(model, names, n_weights) -> dict:
    """Storage of our quantized layers: ``bits_w`` as they are (the benchmark model is fp32, so float EoRA factors are
    fp32), ``bits_w_fp16_factors`` with float factors in fp16/bf16 as in a half-precision checkpoint."""
    layers = [model.get_submodule(n) for n in names]
    bits = sum(m.bits_per_weight * m.out_features * m.in_features for m in layers)
    fp32_factors = sum(m.rank * (m.out_features + m.in_features) for m in layers
                       if m.rank and not getattr(m, "factor_bits", 0))
    ranks = [m.rank for m in layers]
    fbits = {getattr(m, "factor_bits", 0) for m in layers if m.rank}
    return {"bits_w": round(bits / n_weights, 3), "bits_w_fp16_factors": round((bits - 16 * fp32_factors) / n_weights, 3),
            "proj_MB": round(bits / 8 / 1e6, 1),
            "eora_ranks": (f"{min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})"
                           + (f", factors {'/'.join(map(str, sorted(fbits)))}-bit" if any(fbits) else "")
                           if max(ranks) else "-")}


def _score(row: dict, spec: dict, model, tok, copy: bool = False) -> dict:
    """Perplexity of ``model`` under the protocol (our layers scored after ``dequantize()``: the same fp32 weights
    dequant(Q) + U·V the packed layers compute with — tests check it within fp32 rounding — without unpacking the codes
    at every one of the 64 windows, as the CPU reference path is not a kernel; on a copy when more ranks follow)."""
    import copy as copying

    import torch

    from hf_compress.evaluation import perplexity
    from hf_compress.loading import read_text

    if not spec["eval_tokens"]:  # --eval-tokens 0: sizes and compression time only
        return row
    if row["kind"] == "ours" and spec.get("dequantize_for_eval", True):
        model = copying.deepcopy(model) if copy else model
        model.dequantize()
    t0 = time.time()
    with torch.no_grad():
        row["ppl_wikitext"] = perplexity(model, tok, read_text(DATA / "wikitext-2-raw-test.txt"),
                                         max_tokens=spec["eval_tokens"], progress=False).perplexity
        for name in spec.get("extra_eval") or []:  # held-out texts nothing was tuned on (--extra-eval)
            row[f"ppl_{name.split('.')[0]}"] = perplexity(model, tok, read_text(DATA / name),
                                                          max_tokens=spec["extra_eval_tokens"], progress=False).perplexity
    row["eval_s"] = round(time.time() - t0, 1)
    row["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _parse_row(text: str, learn_rounding: dict | None = None) -> dict:
    head, *more = text.split(":")
    name, *mods = head.split("+")
    unknown = set(mods) - {"rot", "rot2", "orth", "act", "lr", "ms", "awq"}
    if unknown:
        raise SystemExit(f"unknown row modifier(s) {sorted(unknown)} in {text!r}: use +rot, +rot2, +orth, +act, +lr, "
                         "+ms, +awq")
    extra = {"rotate": "orthogonal" if "orth" in mods else "hadamard" if {"rot", "rot2"} & set(mods) else None,
             "rotate_heads": "rot2" in mods, "act": "act" in mods, "ms": "ms" in mods,
             "awq": "awq" in mods}
    if "lr" in mods:
        extra["lr"] = dict(learn_rounding or {})
    if name == "dense":
        return {"kind": "dense", "method": "dense fp32", "bits": 32, "group_size": "-", "eora": 0,
                "rotate": extra["rotate"], "rotate_heads": extra["rotate_heads"]}
    spec = _parse_quant_row(":".join([name, *more]))
    return {**spec, **extra} if spec["kind"] == "ours" else spec


def _parse_quant_row(text: str) -> dict:
    name, bits, group, *rest = text.split(":")
    bits = bits if bits.startswith("avg") and float(bits[3:]) > 0 else int(bits)
    groups = [int(g) for g in group.split("/")]  # avgX:G1/G2/...: group_choices (group_size: the first)
    group = groups[0]
    choices = [int(b) for b in rest.pop()[1:].split("/")] if rest and rest[-1].startswith("w") else None
    factor_bits = int(rest.pop()[1:]) if rest and rest[-1].startswith("q") else None
    eora = rest[0] if rest else "0"
    eora = eora if eora.startswith("b") else ([int(r) for r in eora.split("/")] if "/" in eora else int(eora))
    if name == "hqq-package":
        return {"kind": "hqq", "method": "HQQ package 0.2.8", "bits": bits, "group_size": group, "eora": 0}
    if name == "quanto":
        return {"kind": "quanto", "method": "optimum-quanto qint4", "bits": 4, "group_size": 128, "eora": 0}
    mixed = {"group_choices": groups} if len(groups) > 1 else {}
    if choices:
        mixed["bit_choices"] = choices
    return {"kind": "ours", "method": name, "bits": bits, "group_size": group, "eora": eora, "factor_bits": factor_bits,
            **mixed}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["4:128", "3:64", "2:32"], help="bits:group_size")
    p.add_argument("--methods", nargs="+", default=["rtn", "hqq", "gptq"])
    p.add_argument("--eora", nargs="+", type=int, default=[0, 16, 32, 64], help="EoRA ranks (0: none)")
    p.add_argument("--peers", nargs="*", default=["hqq", "quanto"])
    p.add_argument("--calib", default="gutenberg-pg1342.txt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--extra-eval", nargs="*", default=[], metavar="FILE",
                   help="also the perplexity on these files of ../shared/data (a column ppl_<name> each), e.g. "
                        "gutenberg-pg2701.txt: text no setting was chosen on")
    p.add_argument("--extra-eval-tokens", type=int, default=16384)
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--learn-rounding", default="{}", metavar="JSON",
                   help='options of the +lr rows (learn_rounding), e.g. \'{"iters": 50, "batch_size": 2}\'')
    p.add_argument("--method-kwargs", default="{}", metavar="JSON",
                   help='options of the method in every hf-compress row (method_kwargs), e.g. \'{"damp": 0.1}\'')
    p.add_argument("--rows", nargs="+", help="explicit rows instead of the grid: dense[+rot], "
                                             "METHOD[+rot][+act][+lr]:BITS|avgX:GROUP[:EORA|:bBUDGET], hqq-package:BITS:GROUP, "
                                             "quanto:4:128")
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        for row in run_row(json.loads(args.row)):
            print("ROW " + json.dumps(row), flush=True)
        return
    base = {"calib": args.calib, "nsamples": args.nsamples, "eval_tokens": args.eval_tokens,
            "extra_eval": args.extra_eval, "extra_eval_tokens": args.extra_eval_tokens}
    specs = [] if args.no_dense else [{"kind": "dense", "method": "dense fp32", "bits": 32, "group_size": "-", "eora": 0}]
    for setting in args.settings:
        bits, group = map(int, setting.split(":"))
        for m in args.methods:  # one compression per method, scored at each EoRA rank by truncation
            eora = sorted(set(args.eora)) if len(set(args.eora)) > 1 else args.eora[0]
            specs.append({"kind": "ours", "method": m, "bits": bits, "group_size": group, "eora": eora})
        if "hqq" in args.peers:
            specs.append({"kind": "hqq", "method": "HQQ package 0.2.8", "bits": bits, "group_size": group, "eora": 0})
        if "quanto" in args.peers and bits == 4:
            specs.append({"kind": "quanto", "method": "optimum-quanto qint4", "bits": 4, "group_size": 128, "eora": 0})
    if args.rows:
        specs = [_parse_row(r, json.loads(args.learn_rounding)) for r in args.rows]
        kwargs = json.loads(args.method_kwargs)
        specs = [{**s, "method_kwargs": kwargs} if kwargs and s["kind"] == "ours" else s for s in specs]
    jobs = [(f"{s['method']} w{s['bits']} g{s['group_size']} r{s['eora']}", [json.dumps({**base, **s})]) for s in specs]
    results = run_rows(__file__, jobs)
    extra = [f"ppl_{name.split('.')[0]}" for name in args.extra_eval]
    print_table(results, ["method", "bits", "group_size", "eora", "eora_ranks", "widths", "ppl_wikitext", *extra, "bits_w",
                          "bits_w_fp16_factors", "proj_MB", "other_params_M", "compress_s",
                          "lr_s", "lr_kept", "compress_peak_rss_MB", "eval_s", "error"],
                title=f"\nSmolLM2-135M, perplexity on the first {args.eval_tokens} tokens of WikiText-2 raw test; "
                      f"calibration {args.nsamples} x 512 tokens of {args.calib}")


if __name__ == "__main__":
    sys.exit(main())
