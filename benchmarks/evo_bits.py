"""Experiment: an EvoPress-style search on the joint loss for mixed-width allocations (issue 38's "mixed precision
at an average of 3.0 bits/w" target), measured on SmolLM2-135M with benchmarks/quant.py's protocol.

The package's allocator (`hf_compress.allocation.allocate_layer_formats`) prices every unit (q/k/v, o, gate/up, down
of one block) alone and adds the prices; docs/quantization.md measured that this additivity is what fails. This script
runs the package's own row (``gptq+act:avgB:G:wW``) with that allocator replaced, for this run only, by:

1. the package's allocation as the starting point (the same errors, groups and budget it was given);
2. a database of every target layer rounded to each allowed format by ``rtn`` with ``grid="mse-act"`` (a fast proxy for
   gptq's result; channel weights from the dense model's input second moments on the first calibration windows);
3. a (1 + λ) evolutionary search (EvoPress, Sieberling et al. 2024, simplified): each offspring moves 1–3 pairs of
   units one format up and one down in stored bits, within the budget; offspring are ranked by the KL divergence of the
   proxy-quantized model's next-token distribution from the dense model's on one calibration window, the best two are
   scored on all ``--fitness-windows`` and the best replaces the parent when its KL is lower.

The chosen formats then go back to the package's pipeline, which compresses with gptq + mse-act as in the plain row,
and the table is benchmarks/quant.py's. Nothing of this is an option of the package: it is the measurement that says
whether a joint-loss search is worth building.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/evo_bits.py --row gptq+act:avg3.0:64/96/192/288/576/768/1536:w2/3
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _quant_module():
    spec = importlib.util.spec_from_file_location("quant_bench", HERE / "quant.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quant_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


class Search:
    def __init__(self, args, quant):
        from hf_compress.calibration import calibration_windows
        from hf_compress.loading import load_model, smollm2_gguf_path

        self.args = args
        self.model, tok = load_model(smollm2_gguf_path())
        self.model.eval()
        windows = calibration_windows(str(quant.DATA / args.calib), tok, nsamples=32, seqlen=512, seed=0)
        self.windows = windows[: args.fitness_windows, : args.fitness_tokens]
        self.stats_windows = windows[: args.stats_windows]

    def log(self, msg):
        print(f"[evo {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    @torch.inference_mode()
    def _forward_logprobs(self, ids):
        return torch.log_softmax(self.model(input_ids=ids[None]).logits[0].float(), -1)

    def prepare(self, shapes, errors):
        """Dense reference distributions, per-layer channel weights and the proxy database."""
        from hf_compress.methods.rtn import RTN

        t0 = time.time()
        mods = {n: self.model.get_submodule(n) for n in shapes}
        self.dense_w = {n: m.weight.detach().clone() for n, m in mods.items()}
        sq = {n: torch.zeros(shapes[n][1], dtype=torch.float64) for n in shapes}
        count = [0]

        def hook(name):
            def f(_m, inp, _out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                sq[name] += x.square().sum(0)
            return f

        hs = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
        with torch.inference_mode():
            for ids in self.stats_windows:
                self.model(input_ids=ids[None])
                count[0] += ids.numel()
        for h in hs:
            h.remove()
        self.dense_lp = [self._forward_logprobs(ids) for ids in self.windows]
        rtn = RTN(grid="mse-act")
        self.db = {}
        for n in shapes:
            stats = type("S", (), {"gram": torch.diag(sq[n] / count[0]), "count": 1})()
            w = self.dense_w[n].float()
            for f in errors[n]:
                q = rtn.quantize(w, f[0], f[1], stats, torch.float16)
                self.db[n, f] = q.dequantize(w.shape[1]).to(torch.float16)
        self.mods = mods
        self.loaded = {n: None for n in shapes}
        self.log(f"database: {len(self.db)} (layer, format) entries in {time.time() - t0:.0f} s")

    def load(self, alloc):
        for n, f in alloc.items():
            if self.loaded[n] != f:
                self.mods[n].weight.data.copy_(self.db[n, f])
                self.loaded[n] = f

    def restore(self):
        for n, m in self.mods.items():
            m.weight.data.copy_(self.dense_w[n])

    @torch.inference_mode()
    def kl(self, alloc, windows):
        self.load(alloc)
        total = 0.0
        for i in windows:
            lp = self._forward_logprobs(self.windows[i])
            ref = self.dense_lp[i]
            total += float((ref.exp() * (ref - lp)).sum(-1).mean())
        return total / len(windows)

    def run(self, errors, shapes, groups, avg_bits, scale_bits, start):
        from hf_compress.allocation import stored_bits

        grouped = {n for g in groups for n in g}
        units = [list(g) for g in groups] + [[n] for n in shapes if n not in grouped]
        fmts = [sorted(set.intersection(*(set(errors[n]) for n in u)),
                       key=lambda f, u=u: sum(stored_bits(*shapes[n], f[0], f[1], scale_bits) for n in u))
                for u in units]
        cost = [{f: sum(stored_bits(*shapes[n], f[0], f[1], scale_bits) for n in u) for f in fs}
                for u, fs in zip(units, fmts)]
        budget = avg_bits * sum(o * i for o, i in shapes.values())
        state = [fmts[k].index(start[u[0]]) for k, u in enumerate(units)]

        def alloc_of(st):
            return {n: fmts[k][st[k]] for k, u in enumerate(units) for n in u}

        def total(st):
            return sum(cost[k][fmts[k][st[k]]] for k in range(len(units)))

        rng = random.Random(self.args.seed)
        every = list(range(len(self.windows)))
        parent_kl = self.kl(alloc_of(state), every)
        start_kl = parent_kl
        self.log(f"{len(units)} units; start (package allocator): KL {parent_kl:.4f}, "
                 f"{total(state) / sum(o * i for o, i in shapes.values()):.4f} bits/w")
        accepted = 0
        t0 = time.time()
        for gen in range(self.args.generations):
            kids = []
            for _ in range(self.args.offspring):
                st = list(state)
                for _ in range(rng.randint(1, 3)):
                    for _try in range(50):
                        up, down = rng.randrange(len(units)), rng.randrange(len(units))
                        if up == down or st[up] + 1 >= len(fmts[up]) or st[down] == 0:
                            continue
                        trial = list(st)
                        trial[up] += 1
                        trial[down] -= 1
                        if total(trial) <= budget:
                            st = trial
                            break
                if st != state:
                    kids.append(st)
            if not kids:
                continue
            first = sorted(kids, key=lambda st: self.kl(alloc_of(st), [gen % len(self.windows)]))[:2]
            scored = [(self.kl(alloc_of(st), every), st) for st in first]
            best_kl, best = min(scored, key=lambda t: t[0])
            if best_kl < parent_kl:
                state, parent_kl = best, best_kl
                accepted += 1
            if gen % 10 == 9:
                self.log(f"generation {gen + 1}: KL {parent_kl:.4f} ({accepted} accepted, {time.time() - t0:.0f} s)")
        self.log(f"search: KL {start_kl:.4f} -> {parent_kl:.4f} in {self.args.generations} generations, "
                 f"{accepted} accepted, {time.time() - t0:.0f} s; "
                 f"{total(state) / sum(o * i for o, i in shapes.values()):.4f} bits/w")
        self.restore()
        return alloc_of(state)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", default="gptq+act:avg3.0:64/96/192/288/576/768/1536:w2/3")
    p.add_argument("--calib", default="gutenberg-pg1342.txt")
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--fitness-windows", type=int, default=4)
    p.add_argument("--fitness-tokens", type=int, default=256)
    p.add_argument("--stats-windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=32768)
    args = p.parse_args()
    quant = _quant_module()
    import hf_compress.pipelines.sequential as seq

    original = seq.allocate_layer_formats

    def evolved(errors, shapes, groups, avg_bits, scale_bits=16):
        start = original(errors, shapes, groups, avg_bits, scale_bits)
        search = Search(args, quant)
        search.prepare(shapes, errors)
        out = search.run(errors, shapes, groups, avg_bits, scale_bits, start)
        del search
        return out

    seq.allocate_layer_formats = evolved
    spec = {**quant._parse_row(args.row), "calib": args.calib, "nsamples": 32, "eval_tokens": args.eval_tokens,
            "extra_eval": [], "extra_eval_tokens": 0}
    rows = quant.run_row(spec)
    for r in rows:
        r["method"] += " + evolutionary allocation"
    quant.print_table(rows, ["method", "bits", "group_size", "widths", "ppl_wikitext", "bits_w", "compress_s", "eval_s"],
                      title=f"\nSmolLM2-135M, perplexity on the first {args.eval_tokens} tokens of WikiText-2 raw test; "
                            f"calibration 32 x 512 tokens of {args.calib}; {args.generations} generations")


if __name__ == "__main__":
    main()
