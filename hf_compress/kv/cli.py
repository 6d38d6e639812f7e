"""The ``--kv`` options of ``hf-compress compress`` / ``eval`` (called from hf_compress/cli.py)."""

from __future__ import annotations

import json
import time

from ..errors import HfCompressError

KV_HELP = ("KV-cache compression: quant4 | quant2 | gear | quantmix:AVG | lowrank:KEEP | xkv[:KEEP] | snapkv:KEEP | "
           "pyramidkv:KEEP or a JSON spec (KEEP: fraction of the cache kept; AVG: mean bits per cached element, "
           "per-layer widths by measured sensitivity, e.g. quantmix:3.2 or quant4:3.5). lowrank and AVG need --calib.")


def add_kv_args(p, is_eval: bool) -> None:
    if not is_eval:
        p.add_argument("--kv", help=KV_HELP + " Recorded in the checkpoint: generate() uses it by default.")
        return
    p.add_argument("--kv", help="perplexity with a KV cache in the loop: a spec as for compress, 'default' (the "
                                "checkpoint's), or 'dynamic'; compared with DynamicCache in the same run")
    p.add_argument("--kv-context", type=int, default=2048, help="tokens prefilled per window (default 2048)")
    p.add_argument("--kv-continuation", type=int, default=256,
                   help="tokens then scored one at a time through the cache (default 256)")
    p.add_argument("--kv-windows", type=int, default=4, help="windows scored (default 4)")


def eval_kv(model, tokenizer, text: str, args) -> int:
    from .evaluation import greedy_agreement, perplexity_with_cache
    from .hook import default_cache_spec
    from .registry import parse_kv_spec

    spec = args.kv
    if spec == "default":
        spec = default_cache_spec(model)
        if spec is None:
            raise HfCompressError(f"{args.model} records no KV method; give --kv SPEC")
    elif spec != "dynamic":
        spec = parse_kv_spec(spec)
    kw = dict(context=args.kv_context, continuation=args.kv_continuation, windows=args.kv_windows)
    rows = {}
    for name, s in (("DynamicCache", "dynamic"), (json.dumps(spec) if isinstance(spec, dict) else spec, spec)):
        if name in rows:
            continue
        t0 = time.time()
        rows[name] = perplexity_with_cache(model, tokenizer, text, s, **kw)
        r = rows[name]
        print(f"{name}: perplexity {r.perplexity:.4g} over {r.tokens} tokens ({r.windows} x {r.context}+"
              f"{r.continuation}), {r.bytes_per_token:.1f} cache bytes/token, decode {r.decode_seconds:.1f}s "
              f"({time.time() - t0:.0f}s)")
    base, last = rows["DynamicCache"], list(rows.values())[-1]
    if last is not base:
        print(f"bytes/token ratio {base.bytes_per_token / last.bytes_per_token:.2f}x, perplexity "
              f"{100 * (last.perplexity / base.perplexity - 1):+.2f}%, greedy agreement "
              f"{greedy_agreement(base, last):.3f}, decode time ratio {last.decode_seconds / base.decode_seconds:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "text": args.text, **{k: v.to_dict() for k, v in rows.items()}}, f, indent=2)
    return 0
