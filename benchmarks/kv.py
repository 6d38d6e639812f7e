"""KV-cache compression on SmolLM2-135M-Instruct: one command, one table, one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv.py                # every method (about an hour on 1 core)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv.py --methods quant4 snapkv:0.25 --windows 2

Columns, all from this one process and model load:

* bytes/token: real tensor bytes held by the cache after prefill + continuation, per cached token and sequence
  (`hf_compress.kv.cache_nbytes`), and DynamicCache's divided by it. The model runs in fp32 on CPU, so
  DynamicCache holds 4-byte elements; ``x vs 16-bit`` divides a 16-bit DynamicCache's bytes (half of the fp32
  one, exactly) by the method's measured bytes — the method's full-precision parts (recent windows, latents) are
  fp32 here, so this understates the method.
* ppl: perplexity with the cache in the loop (`hf_compress.kv.evaluation.perplexity_with_cache`): ``--windows``
  non-overlapping windows of WikiText-2 raw test, each ``--context`` tokens prefilled into a fresh cache (batch of
  all windows at once), then ``--continuation`` tokens fed one by one through the cache and scored;
* agree: top-1 token agreement with DynamicCache at every scored step (same inputs, teacher-forced);
* decode: wall time of the continuation's decode steps relative to DynamicCache's in this run;
* needle: passkey retrieval (`needle_retrieval`), found / trials over ``--needle-lengths`` x depths 0.25, 0.75.

``quant4-r32`` / ``quant2-r32``: KIVI with a 32-token full-precision window instead of 128. ``kXvY-rR-gG[-w16]``:
keys at X bits, values at Y (``value_bits``), an R-token window, groups of G (keys: G tokens per channel; values: the
largest power of two <= G dividing head_dim), ``-w16``: the window stored in fp16 (``window_dtype``), ``-vf``: values
leave the window token by token (``value_flush`` 1), ``-aA``: per-layer widths from the budget ``avg_bits`` A (each
layer's keys 4 or 3 bits, values 3 or 2, by measured KL sensitivity on ``--calib-windows`` x 512 calibration tokens;
one sensitivity measurement serves every budget of a run, and its time is printed).

Peer: transformers' own ``QuantizedCache`` (quanto backend, int4/int2, its defaults: q_group_size 64, residual
128) when optimum-quanto is installed. ``lowrank`` rows are calibrated on 16 x 512 tokens of gutenberg-pg1342.txt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DATA, print_table
DEFAULT_METHODS = ["quant4", "quant4-r32", "quant2", "quant2-r32", "gear", "lowrank:0.5", "xkv", "snapkv:0.25",
                   "pyramidkv:0.25", "hf-quanto-int4", "hf-quanto-int2"]
NEEDLE_METHODS = {"dynamic", "quant4", "quant4-r32", "quant2", "gear", "lowrank:0.5", "xkv", "snapkv:0.25",
                  "hf-quanto-int4", "k4v3-r16-g128-w16", "k4v3-r16-g128-w16-vf-a3.25"}
# named variants (anything else is a CLI spec: quant4, snapkv:0.25, a JSON object, ...)
VARIANTS = {"quant4-r32": {"method": "quant", "bits": 4, "residual": 32},
            "quant2-r32": {"method": "quant", "bits": 2, "residual": 32},
            "k4v2-r32": {"method": "quant", "bits": 4, "value_bits": 2, "residual": 32},
            "k4v2-r32-g64": {"method": "quant", "bits": 4, "value_bits": 2, "residual": 32, "group_size": 64},
            # 3-bit values, the recent window in fp16 (the benchmark model is fp32)
            "k4v3-r32-g64-w16": {"method": "quant", "bits": 4, "value_bits": 3, "residual": 32, "group_size": 64,
                                 "window_dtype": "float16"},
            "k4v3-r16-g128-w16": {"method": "quant", "bits": 4, "value_bits": 3, "residual": 16, "group_size": 128,
                                  "window_dtype": "float16"},
            "k3v3-r32-g64-w16": {"method": "quant", "bits": 3, "residual": 32, "group_size": 64,
                                 "window_dtype": "float16"}}
# values leave the window token by token (value_flush 1: only keys wait for a whole group)
VARIANTS["k4v3-r16-g128-w16-vf"] = {**VARIANTS["k4v3-r16-g128-w16"], "value_flush": 1}
# ... and per-layer widths from a budget: halves one width lower (keys 4->3, values 3->2) by measured sensitivity
for _avg in ("3.3", "3.25", "3.2", "3.1", "3.0", "2.75"):
    VARIANTS[f"k4v3-r16-g128-w16-vf-a{_avg}"] = {**VARIANTS["k4v3-r16-g128-w16-vf"], "avg_bits": float(_avg)}


def hf_quantized_factory(model, nbits):
    from transformers import QuantizedCache

    def make():
        return QuantizedCache(backend="quanto", config=model.config, nbits=nbits)

    make()  # raises here if the backend is missing
    return make


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--text", default=str(DATA / "wikitext-2-raw-test.txt"))
    p.add_argument("--calib", default=str(DATA / "gutenberg-pg1342.txt"))
    p.add_argument("--calib-windows", type=int, default=16, help="512-token calibration windows (lowrank, avg_bits)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=96)
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--needle-lengths", type=int, nargs="*", default=[1024, 2048, 3072])
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    import torch

    from hf_compress.calibration import calibration_windows
    from hf_compress.kv.allocation import allocate_layer_bits, layer_sensitivity
    from hf_compress.kv.evaluation import greedy_agreement, needle_retrieval, perplexity_with_cache
    from hf_compress.kv.registry import kv_method, parse_kv_spec
    from hf_compress.loading import load_model, smollm2_gguf_path

    torch.manual_seed(0)
    model, tok = load_model(smollm2_gguf_path())
    text = Path(args.text).read_text(encoding="utf-8")
    kw = dict(context=args.context, continuation=args.continuation, windows=args.windows, batch_size=args.windows)
    needle_kw = dict(lengths=args.needle_lengths, depths=(0.25, 0.75))
    title = (f"SmolLM2-135M-Instruct fp32, {args.windows} x ({args.context} + {args.continuation}) tokens of "
             f"{Path(args.text).name}; needle lengths {args.needle_lengths}")
    print(title, flush=True)

    rows = []

    def run(name, cache):
        t0 = time.time()
        r = perplexity_with_cache(model, tok, text, cache, **kw)
        needle = None
        if name in NEEDLE_METHODS and args.needle_lengths:
            found = needle_retrieval(model, tok, cache, **needle_kw)
            needle = (sum(v[0] for v in found.values()), len(found))
        row = {"method": name, "result": r, "needle": needle, "seconds": time.time() - t0}
        rows.append(row)
        base = rows[0]["result"]
        print(f"{name:16s} ppl {r.perplexity:8.3f}  bytes/token {r.bytes_per_token:9.1f} "
              f"({base.bytes_per_token / r.bytes_per_token:5.2f}x)  agree {greedy_agreement(base, r):.3f}  "
              f"decode x{r.decode_seconds / base.decode_seconds:.2f}  needle {needle}  ({row['seconds']:.0f}s)",
              flush=True)

    run("dynamic", None)
    calib = None
    sensitivities = {}
    for name in args.methods:
        try:
            if name.startswith("hf-quanto-int"):
                cache = hf_quantized_factory(model, int(name[-1]))
            else:
                spec = parse_kv_spec(VARIANTS.get(name, name))
                method = kv_method(spec)
                if method.needs_calibration(spec):
                    if calib is None:
                        calib = calibration_windows(args.calib, tok, args.calib_windows, 512, 0)
                    t0 = time.time()
                    if spec.get("avg_bits") is not None:  # one sensitivity measurement serves every budget
                        base_key = json.dumps({**spec, "avg_bits": None}, sort_keys=True)
                        if base_key not in sensitivities:
                            sensitivities[base_key] = layer_sensitivity(model, spec, calib)
                        spec["layer_bits"] = allocate_layer_bits(model, spec, None,
                                                                 sensitivity=sensitivities[base_key])
                    else:
                        spec = method.calibrate(model, spec, calib)
                    print(f"{name:16s} calibrated in {time.time() - t0:.0f}s"
                          + (f": key bits {spec['layer_bits']['k']}, value bits {spec['layer_bits']['v']}"
                             if spec.get("layer_bits") else ""), flush=True)
                cache = spec
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            print(f"{name:16s} not run: {type(e).__name__}: {e}", flush=True)
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
            continue
        run(name, cache)

    base = rows[0]["result"]
    table = []
    for row in rows:
        if "error" in row:
            table.append({"cache": row["method"], "bytes/token": f"not run: {row['error']}"})
            continue
        r = row["result"]
        needle = f"{row['needle'][0]}/{row['needle'][1]}" if row["needle"] else "–"
        table.append({"cache": row["method"], "bytes/token": f"{r.bytes_per_token:,.0f}",
                      "x vs DynamicCache (fp32)": base.bytes_per_token / r.bytes_per_token,
                      "x vs 16-bit": base.bytes_per_token / 2 / r.bytes_per_token, "perplexity": r.perplexity,
                      "Δ ppl": f"{100 * (r.perplexity / base.perplexity - 1):+.2f}%",
                      "greedy agree": greedy_agreement(base, r),
                      "decode time ratio": r.decode_seconds / base.decode_seconds, "needle": needle})
    print_table(table, title="\n" + title,
                formats={"x vs DynamicCache (fp32)": ".2f", "x vs 16-bit": ".2f", "perplexity": ".3f",
                         "greedy agree": ".3f", "decode time ratio": ".2f"})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{**{k: v for k, v in row.items() if k != "result"},
                        **({"result": row["result"].to_dict()} if "result" in row else {})} for row in rows], f,
                      indent=2)


if __name__ == "__main__":
    main()
