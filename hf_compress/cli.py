"""The ``hf-compress`` command line: compress, eval, info, finetune, card, push, export, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time

from .errors import HfCompressError


def _add_compression_args(p: argparse.ArgumentParser) -> None:
    from .methods import available_methods
    from .recipes import RECIPES
    from .transforms import ROTATIONS

    p.add_argument("--method", default="svd", choices=available_methods() + sorted(RECIPES),
                   help="compression method (default: svd), or the recipe 'best' (with --bits, --group-size: the "
                        "options that measured best at those bytes; docs/quantization.md)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, help="fraction of the targeted layers' parameters to remove, in (0, 1)")
    g.add_argument("--rank", type=int, help="one rank for every targeted layer")
    p.add_argument("--targets", nargs="+", help="module name patterns (default: all linear layers in the blocks)")
    p.add_argument("--skip", nargs="+", default=[], help="module name patterns to leave dense")
    p.add_argument("--vision", action="store_true",
                   help="vision-language models: also compress the vision tower and projector (data-free methods)")
    p.add_argument("--alloc", choices=["uniform", "energy"], help="rank allocation (default: the method's best)")
    p.add_argument("--calib", help="calibration text file (calibrated methods)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--method-kwargs", default="{}", help='method options as JSON, e.g. \'{"alpha": 0.5}\'')
    p.add_argument("--rotate", choices=ROTATIONS.names(),
                   help="fold the RMSNorms and rotate the residual stream before compressing (Llama-architecture "
                        "decoders; the model stays a plain model of its class)")
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation (default 0)")
    p.add_argument("--rotate-heads", action="store_true",
                   help="with --rotate, also rotate each attention head's values (folded into v_proj and o_proj)")
    q = p.add_argument_group("quantization (with rtn|hqq|gptq; with a low-rank method: quantize its factors)")
    q.add_argument("--bits", type=int, help="weight bits: 2, 3, 4 or 8")
    q.add_argument("--group-size", type=int, default=128, help="quantization group size (default 128)")
    q.add_argument("--avg-bits", type=float, help="instead of --bits: a width per layer (from --bit-choices) under a "
                                                   "budget of this many bits per weight as stored (codes, scales and "
                                                   "zeros); needs --calib")
    q.add_argument("--bit-choices", type=int, nargs="+", help="with --avg-bits, the widths a layer may get "
                                                               "(default 2 3 4 8)")
    q.add_argument("--group-choices", type=int, nargs="+", help="with --avg-bits, the group sizes a layer may get "
                                                                 "(default: --group-size alone)")
    q.add_argument("--bits-sensitivity", choices=["gradient", "measured"], default="gradient",
                   help="with --avg-bits, how a layer's error becomes a loss increase: the squared loss gradient at "
                        "its output (default) or the measured KL with its fused unit quantized alone")
    e = q.add_mutually_exclusive_group()
    e.add_argument("--eora-rank", type=int, help="rank of the EoRA low-rank compensation of the quantization error")
    e.add_argument("--eora-bits", type=float, help="EoRA with per-layer ranks from a budget of this many extra bits "
                                                    "per weight (averaged over the quantized layers)")
    q.add_argument("--eora-factor-bits", type=int, help="store the EoRA factors as packed codes of this many bits "
                                                        "(2, 3, 4, 8) instead of in the model's dtype")
    q.add_argument("--eora-factor-group-size", type=int, default=128,
                   help="group size of the quantized EoRA factors (default 128)")
    q.add_argument("--learn-rounding", nargs="?", const="{}", metavar="JSON",
                   help="with rtn|gptq (calibrated): learn each block's rounding offsets and per-group clipping against "
                        "the dense block's outputs (AutoRound-style); optional JSON options, e.g. "
                        '\'{"iters": 200, "lr": 0.005, "batch_size": 4, "min_clip": 0.5, "seed": 0}\' '
                        "(docs/quantization.md#learned-rounding)")
    q.add_argument("--channel-scales", choices=["awq"],
                   help="with rtn|hqq|gptq (calibrated): fold activation-aware channel scales into each block before "
                        "it is quantized (AWQ; exact, no bytes added; docs/quantization.md#channel-scales)")
    q.add_argument("--quantizer", help="how a low-rank method's factors are quantized (default: gptq when "
                                       "calibrated, hqq otherwise)")


def _add_provenance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", help="Hub id of the base model, for the model card (default: what was loaded, "
                                        "when it is known)")
    p.add_argument("--license", help="license for the model card (default: the base model's, when known)")


#: the calibrated pipeline's summary lines (logged at INFO) that the CLI prints at any verbosity: learned rounding
#: (blocks whose learned codes were kept, seconds spent in it this run); channel scales (mappings scaled, left out)
SUMMARIES = ("learned rounding: kept", "channel scales (")


@contextlib.contextmanager
def _pipeline_summaries():
    """Yields a list that receives the calibrated pipeline's summary lines (`SUMMARIES`), so that the CLI prints
    them at any verbosity."""
    lines: list[str] = []
    log = logging.getLogger("hf_compress.pipelines.sequential")
    level, shown = log.level, log.getEffectiveLevel()

    def catch(record):  # a logger filter: records below the level the user asked for go no further
        if record.getMessage().startswith(SUMMARIES):
            lines.append(record.getMessage())
        return record.levelno >= shown

    log.addFilter(catch)
    log.setLevel(min(shown, logging.INFO))
    try:
        yield lines
    finally:
        log.removeFilter(catch)
        log.setLevel(level)


def _config_from_args(args):
    from .config import CompressionConfig

    from .methods import get_method
    from .recipes import is_recipe

    low_rank = not is_recipe(args.method) and get_method(args.method).family == "lowrank"
    kv = getattr(args, "kv", None)
    ratio = args.ratio if (args.ratio is not None or args.rank is not None or not low_rank) else (None if kv else 0.2)
    try:
        method_kwargs = json.loads(args.method_kwargs)
    except json.JSONDecodeError as e:
        raise HfCompressError(f"--method-kwargs is not valid JSON: {e}") from None
    learn_rounding = getattr(args, "learn_rounding", None)
    if learn_rounding is not None:
        try:
            learn_rounding = json.loads(learn_rounding)
        except json.JSONDecodeError as e:
            raise HfCompressError(f"--learn-rounding is not valid JSON: {e}") from None
        learn_rounding = learn_rounding if learn_rounding != {} else True
    calibration = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                   "source": os.path.basename(args.calib) if args.calib else None}
    return CompressionConfig(method=args.method, ratio=ratio, rank=args.rank, targets=args.targets, skip=args.skip,
                             vision=bool(getattr(args, "vision", False)), alloc=args.alloc, method_kwargs=method_kwargs, calibration=calibration, bits=args.bits,
                             group_size=args.group_size, avg_bits=getattr(args, "avg_bits", None),
                             bit_choices=getattr(args, "bit_choices", None),
                             group_choices=getattr(args, "group_choices", None),
                             bits_sensitivity=getattr(args, "bits_sensitivity", "gradient"), eora_rank=args.eora_rank, eora_bits=args.eora_bits,
                             eora_factor_bits=args.eora_factor_bits,
                             eora_factor_group_size=args.eora_factor_group_size, quantizer=args.quantizer, kv=kv,
                             rotate=args.rotate, rotate_seed=args.rotate_seed,
                             rotate_heads=args.rotate_heads, learn_rounding=learn_rounding,
                             channel_scales=getattr(args, "channel_scales", None))


def cmd_compress(args) -> int:
    from .compressor import compress
    from .hub import save_pretrained
    from .hub import add_evaluation, provenance_of
    from .loading import load_model, read_text
    from .progress import format_seconds, peak_rss_mb, reset_peak_rss, rss_mb
    from .coverage import TITLE as COVERAGE_TITLE, coverage_report
    from .summary import size_breakdown

    config = _config_from_args(args)
    partial = _partial_dir(args.output)
    if partial.exists() and not args.resume:
        raise HfCompressError(f"{partial} holds an interrupted compression into {args.output}: rerun with --resume to "
                              "continue it, or delete it to start over.")
    t0 = time.time()
    model, tokenizer = load_model(args.model, **_placement_args(args))
    print(f"loaded {args.model} ({type(model).__name__}) in {time.time() - t0:.1f}s; RSS now {rss_mb():.0f} MiB, "
          f"peak while loading {peak_rss_mb():.0f} MiB")
    reset_peak_rss()  # the peaks printed from here on are the compression's (and the save's)
    placement = getattr(model, "hf_device_map", None)
    if args.device_map and placement:
        where = {d: sum(1 for v in placement.values() if v == d) for d in dict.fromkeys(placement.values())}
        print("placement (modules per device): " + ", ".join(f"{d}: {n}" for d, n in where.items()))
    config.provenance = {**provenance_of(model), **_provenance_args(args), "command": _command_line()}
    base = None
    eval_text = read_text(args.eval_text) if args.eval_text else None
    if eval_text:
        print("perplexity of the model before compression:")
        base = _print_ppl(model, tokenizer, eval_text, args)
    t0 = time.time()
    with _pipeline_summaries() as summaries:
        compress(model, config, calibration=args.calib, tokenizer=tokenizer, checkpoint_dir=partial,
                 checkpoint_every=args.checkpoint_every)
    sizes = size_breakdown(model)
    now, dense = sizes["compressed_now"], sizes["compressed_dense"]
    print(f"compressed {sizes['compressed_layers']} layers with {config.method} in {format_seconds(time.time() - t0)} "
          f"({time.time() - t0:.1f}s), peak RSS {peak_rss_mb():.0f} MiB; their bytes {dense:,} -> {now:,} "
          f"({now / max(dense, 1):.3f}x)")
    for line in summaries:
        print(line)
    print(COVERAGE_TITLE)
    print(coverage_report(model, skip=config.skip).format_table())
    if eval_text:
        print("perplexity of the compressed model:")
        after = _print_ppl(model, tokenizer, eval_text, args)
        name = os.path.basename(args.eval_text)
        add_evaluation(model, base, dataset=name, base=True, command=_command_line())
        add_evaluation(model, after, dataset=name, command=_command_line())
    save_pretrained(model, args.output, tokenizer=tokenizer)
    _remove_tree(partial)  # the checkpoint is complete: the resume state has served
    print(f"saved {args.output} (model card: {os.path.join(args.output, 'README.md')}); peak RSS {peak_rss_mb():.0f} "
          f"MiB, now {rss_mb():.0f} MiB of which {rss_mb('RssFile'):.0f} MiB file pages")
    return 0


def _partial_dir(output: str):
    """Where an interrupted ``compress -o OUT`` keeps its finished blocks: ``OUT.partial`` beside the output."""
    from pathlib import Path

    out = Path(output).resolve()
    return out.with_name(out.name + ".partial")


def _remove_tree(path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _placement_args(args) -> dict:
    """from_pretrained's placement options (accelerate big-model loading) from --device-map / --max-memory /
    --offload-folder."""
    kw = {}
    if args.device_map:
        kw["device_map"] = json.loads(args.device_map) if args.device_map.startswith("{") else args.device_map
    if args.max_memory:
        try:
            kw["max_memory"] = {(int(k) if k.isdigit() else k): (int(v) if v.isdigit() else v) for k, v in
                                (item.split("=", 1) for item in args.max_memory)}  # a bare number: bytes
        except ValueError:
            raise HfCompressError(f"--max-memory takes DEVICE=SIZE items (cpu=4GiB 0=20GiB), got {args.max_memory}") from None
    if args.offload_folder:
        kw["offload_folder"] = args.offload_folder
    if kw and "device_map" not in kw:
        raise HfCompressError("--max-memory / --offload-folder need --device-map (e.g. --device-map auto)")
    return kw


_ARGV: list[str] = []


def _command_line() -> str:
    """The command being run, as the user typed it (recorded beside the numbers it produces)."""
    return "hf-compress " + shlex.join(_ARGV)


def _provenance_args(args) -> dict:
    return {k: v for k, v in (("base_model", getattr(args, "base_model", None)),
                               ("license", getattr(args, "license", None))) if v}


def _print_ppl(model, tokenizer, text, args):
    from .evaluation import perplexity

    t0 = time.time()
    r = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_tokens=args.max_tokens)
    print(f"tokens {r.tokens}  windows {r.windows}x{r.seqlen}  perplexity {r.perplexity:.4g}  ({time.time() - t0:.0f}s)")
    return r


def cmd_eval(args) -> int:
    from .loading import load_model, read_text

    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise HfCompressError(f"{args.model} has no tokenizer; save it beside the model to evaluate.")
    if args.kv:  # perplexity with the KV cache in the loop (hf_compress/kv/cli.py)
        from .kv.cli import eval_kv

        return eval_kv(model, tokenizer, read_text(args.text), args)
    r = _print_ppl(model, tokenizer, read_text(args.text), args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "text": args.text, **r.to_dict()}, f, indent=2)
    from .hub import add_evaluation, is_checkpoint_dir, model_evaluations, save_evaluations, write_model_card

    if is_checkpoint_dir(args.model) and not args.no_record:
        add_evaluation(model, r, dataset=os.path.basename(args.text), command=_command_line())
        save_evaluations(args.model, model_evaluations(model))
        write_model_card(model, args.model)
        print(f"recorded in {os.path.join(args.model, 'hf_compress_eval.json')}; model card regenerated")
    return 0


def cmd_card(args) -> int:
    from .hub import is_checkpoint_dir, write_model_card
    from .loading import load_model

    if not is_checkpoint_dir(args.model):
        raise HfCompressError(f"{args.model} is not an hf-compress checkpoint folder.")
    model, _ = load_model(args.model, dtype="auto")
    path = write_model_card(model, args.model, repo_id=args.repo_id, **_provenance_args(args))
    print(f"wrote {path}")
    return 0


def cmd_push(args) -> int:
    from .hub import push_to_hub

    info = push_to_hub(args.model, args.repo_id, private=args.private or None, revision=args.revision,
                       create_pr=args.create_pr, commit_message=args.commit_message, token=args.token,
                       **_provenance_args(args))
    print(f"pushed {args.model} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def cmd_info(args) -> int:
    from .coverage import TITLE as COVERAGE_TITLE, coverage_report
    from .loading import load_model
    from .summary import format_table

    model, _ = load_model(args.model)
    q = getattr(model.config, "quantization_config", None)
    what = ", dense"
    if hasattr(q, "method"):
        what = f", hf-compress method {q.method}" + (f", {q.bits}-bit g{q.group_size}" if q.bits else "")
    print(f"{args.model}: {type(model).__name__}{what}")
    if getattr(q, "kv", None):
        print(f"KV cache (used by generate() by default): {json.dumps(q.kv)}")
    print(COVERAGE_TITLE)
    print(coverage_report(model).format_table())
    print()
    print(format_table(model))
    from .kernels.cpu import weights as cpu_kernels

    print(cpu_kernels.describe())
    return 0


def cmd_finetune(args) -> int:
    from .hub import save_pretrained
    from .finetune import recover
    from .loading import load_model, read_text

    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise HfCompressError(f"{args.model} has no tokenizer; save it beside the model to fine-tune.")
    if args.eval_text:
        before = _print_ppl(model, tokenizer, read_text(args.eval_text), args)
    t0 = time.time()
    model, losses = recover(model, tokenizer, args.text, steps=args.steps, rank=args.lora_rank, lr=args.lr,
                            seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed,
                            merge=not args.adapter_only)
    print(f"fine-tuned {args.steps} steps in {time.time() - t0:.0f}s; training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if args.eval_text:
        after = _print_ppl(model, tokenizer, read_text(args.eval_text), args)
        print(f"perplexity {before.perplexity:.4g} -> {after.perplexity:.4g}")
        if not args.adapter_only:  # the merged model's card shows what was measured on it
            from .hub import add_evaluation

            add_evaluation(model, after, dataset=os.path.basename(args.eval_text), command=_command_line())
    if args.adapter_only:
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
    else:
        save_pretrained(model, args.output, tokenizer=tokenizer)
    print(f"saved {args.output}")
    return 0


def cmd_export(args) -> int:
    from .export import export

    print(export(args.model, args.output, format=args.format, dense_lowrank=args.dense_lowrank,
                 dtype=args.dtype, requantize=args.requantize, gguf_tokenizer=args.gguf_tokenizer).summary())
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(ratio=args.ratio, method=args.method, text_path=args.text, max_tokens=args.max_tokens,
             output=args.output, targets=args.targets, nsamples=args.nsamples, bits=args.bits,
             group_size=args.group_size, command=_command_line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-compress", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model and save a checkpoint")
    p.add_argument("model", help="local checkpoint directory, .gguf file, or Hub id")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    _add_compression_args(p)
    p.add_argument("--eval-text", help="also measure perplexity on this text file before and after compression; "
                                        "recorded beside the checkpoint and shown in its model card")
    r = p.add_argument_group("large models and long runs")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from the blocks checkpointed "
                                                         "in OUTPUT.partial (same settings; the result is identical)")
    r.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="commit finished blocks to OUTPUT.partial at most this often (default 60)")
    r.add_argument("--device-map", help="accelerate device map for loading: auto, balanced, sequential, cpu, cuda, "
                                        "or a JSON {module: device|\"disk\"}; with --offload-folder, what does not "
                                        "fit --max-memory is offloaded to disk and read block by block")
    r.add_argument("--max-memory", nargs="+", metavar="DEVICE=SIZE", help="per-device memory for --device-map, e.g. "
                                                                          "cpu=4GiB 0=20GiB")
    r.add_argument("--offload-folder", help="folder for the weights accelerate offloads to disk")
    _add_provenance_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity of a model on a text file")
    p.add_argument("model")
    p.add_argument("--text", required=True, help="plain-text file")
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("--no-record", action="store_true",
                   help="do not record the result in the checkpoint's hf_compress_eval.json / model card")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("card", help="(re)generate the model card (README.md + plot) of a compressed checkpoint")
    p.add_argument("model", help="compressed checkpoint directory")
    p.add_argument("--repo-id", help="Hub repository id shown in the card's loading snippet")
    _add_provenance_args(p)
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("push", help="upload a compressed checkpoint to the Hub with a regenerated model card")
    p.add_argument("model", help="compressed checkpoint directory")
    p.add_argument("repo_id", help="Hub repository id, e.g. user/model-svd-0.2")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message")
    p.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`)")
    _add_provenance_args(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("finetune", help="recovery fine-tuning: LoRA on the compressed layers, then an exact merge")
    p.add_argument("model", help="compressed checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output directory (merged checkpoint, or the adapter)")
    p.add_argument("--text", required=True, help="training text file")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine schedule; default 2e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter-only", action="store_true", help="save the LoRA adapter instead of merging it")
    p.add_argument("--eval-text", help="report perplexity on this text before and after")
    p.set_defaults(func=cmd_finetune)

    for p in (sub.choices["compress"], sub.choices["eval"], sub.choices["finetune"]):
        p.add_argument("--seqlen", type=int, default=512,
                       help="window length of calibration and evaluation windows (default 512)")
        p.add_argument("--max-tokens", type=int, default=32768, help="tokens of the text scored (default 32768)")
        from .kv.cli import add_kv_args

        add_kv_args(p, p is sub.choices["eval"])

    from .export import FORMATS

    p = sub.add_parser("export", help="write a compressed checkpoint in a format stock engines load (docs/export.md)")
    p.add_argument("model", help="compressed checkpoint directory")
    p.add_argument("-o", "--output", required=True,
                   help="output directory, or the .gguf file for --format gguf (written atomically)")
    p.add_argument("--format", default="compressed-tensors", choices=FORMATS,
                   help="compressed-tensors: pack-quantized layers (+ a PEFT LoRA adapter for EoRA factors), "
                        "what vLLM / SGLang / transformers load; dense: every layer multiplied out; gguf: one "
                        "llama.cpp file (Llama architecture; exact Q4_1/Q4_0/Q8_0 where our grid is theirs)")
    p.add_argument("--dense-lowrank", action="store_true",
                   help="compressed-tensors: multiply low-rank layers out to dense weights instead of refusing them")
    p.add_argument("--dtype", help="cast embeddings, norms, dense layers and adapter factors to this dtype, e.g. "
                                   "bfloat16 (quantization scales keep their stored dtype; default: as stored)")
    p.add_argument("--requantize", choices=["Q8_0", "Q4_0", "Q4_1"],
                   help="gguf: re-quantize layers without an exact GGUF type with gguf's quantizer (default: dense)")
    p.add_argument("--gguf-tokenizer", metavar="FILE.gguf",
                   help="gguf: copy the tokenizer.* keys of this GGUF file (default: the GGUF the model came from, "
                        "else built from the checkpoint's tokenizer)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="per-layer table of a (compressed) model and its coverage by kind")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="offline end-to-end demo on SmolLM2-135M")
    p.add_argument("--method", default="hqq", help="hqq (default: 4-bit, data-free; on CPU it runs on the int4 "
                   "kernels), rtn, gptq, or a low-rank method: svd, svd_llm (calibrated) ...")
    p.add_argument("--bits", type=int, help="weight bits of a quantization method (default 4); with a low-rank "
                   "method: quantize its factors")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--ratio", type=float, help="low-rank methods: fraction of the parameters removed (default 0.2)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens (default 16)")
    p.add_argument("--targets", nargs="+", default=None)
    p.add_argument("--text", help="evaluation text (default: ../shared/data WikiText-2 if found, else a shipped excerpt)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("-o", "--output", help="where to save the compressed checkpoint (default: a temporary folder)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (HfCompressError, FileNotFoundError) as e:
        print(f"hf-compress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
