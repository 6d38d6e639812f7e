"""The model card of a compressed model (``README.md``), rendered from ``hf_compress/model_cards/hf_compress_card.md``
(installed as ``hf_compress.model_cards``) with `huggingface_hub.ModelCard` / `ModelCardData`. Its tables come from
the model itself (`hf_compress.summary`: `layer_table`, `size_breakdown`; `hf_compress.coverage`: the parameters by
kind, compressed and left dense), never from the config's intentions; its evaluation section only from records whose
fingerprint matches the weights (`hf_compress.hub.records`); its plot is `hf_compress.hub.plot`.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from importlib import resources
from pathlib import Path

from torch import nn

from ..version import __version__
from ..atomic import atomic_file
from ..coverage import Coverage, coverage_report, group_dense_weights
from ..errors import ConfigError
from ..modules import compressed_modules
from ..summary import layer_table, layer_type, size_breakdown
from .plot import PLOT_FILE, plot_layers
from .records import load_evaluations, merge_evaluations, model_evaluations, weights_fingerprint

CARD_FILE = "README.md"
TEMPLATE = "hf_compress_card.md"
LIBRARY_NAME = "transformers"  # the checkpoint loads with transformers' Auto classes (plus the plugin)

PROTOCOL = ("perplexity of the first {max_tokens} tokens of the text cut into non-overlapping {seqlen}-token windows, "
            "each scored independently ({tokens} predicted tokens; `hf_compress.evaluation`)")


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _range(values) -> str:
    values = sorted(values)
    if values[0] == values[-1]:
        return str(values[0])
    return f"{values[0]}–{values[-1]} (mean {sum(values) / len(values):.1f})"


def layer_groups(model: nn.Module) -> list[dict]:
    """Compressed layers grouped by layer type (leaf name): count, shapes, form, rank/bits, bits/w, bytes."""
    modules = compressed_modules(model)
    groups: OrderedDict[str, dict] = OrderedDict()
    for r in layer_table(model):
        if r.kind == "dense":
            continue
        m = modules[r.name]
        g = groups.setdefault(layer_type(r.name), {"type": layer_type(r.name), "rows": [], "kinds": set(),
                                                     "shapes": set(), "ranks": [], "bits": set()})
        g["rows"].append(r)
        g["kinds"].add(r.kind)
        g["shapes"].add(f"{r.shape[0]}×{r.shape[1]}")
        if getattr(m, "rank", 0):
            g["ranks"].append(int(m.rank))
        if getattr(m, "bits", None):
            g["bits"].add(f"{m.bits}-bit g{m.group_size}")
    return list(groups.values())


def _mixed_widths(model, avg_bits: float, choices) -> str:
    """``avg_bits``: how many layers got each width, and what they store on average."""
    from ..modules import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.out_features * m.in_features for m in layers) or 1
    stored = sum(m.bits_per_weight * m.out_features * m.in_features for m in layers) / weights
    if len({m.group_size for m in layers}) > 1:  # group_choices: formats (width, group size)
        fmt = {f: sum((m.bits, m.group_size) == f for m in layers) for f in sorted({(m.bits, m.group_size) for m in layers})}
        per_layer = ', '.join(f'{n} layers at {b}-bit g{g}' for (b, g), n in fmt.items())
    else:
        count = {b: sum(m.bits == b for m in layers) for b in sorted({m.bits for m in layers})}
        per_layer = ', '.join(f'{n} layers at {b}-bit' for b, n in count.items())
    return (f"bit widths per layer ({per_layer}; chosen from "
            f"{list(choices)} under a budget of {avg_bits:g} bits per weight as stored, {stored:.3f} used, "
            "layers that read the same input sharing a width)")


def _compressed_section(model, config, groups) -> str:
    rows = layer_table(model)
    n_comp = sum(r.kind != "dense" for r in rows)
    lines = [f"{n_comp} of {len(rows)} linear layers are compressed "
             f"(method `{config.method}`, family {config.family})."]
    try:
        from ..targets import find_targets

        # targeted layers that are still dense
        kept = len(find_targets(model, config.targets, config.skip, getattr(config, "vision", False)))
    except Exception:
        kept = 0
    if kept:
        lines[-1] += (f" {kept} targeted layers stayed dense: the rank allocation found that factorising them would "
                      "not pay for its error (or not save bytes).")
    from ..targets import language_model, other_modalities

    language = language_model(model)
    if language:  # a multimodal model: what outside its language model stayed dense
        parts = other_modalities(model, language)
        lines[-1] += (f" Compressed: the language model (`{language}`); left dense: "
                      + ", ".join(f"`{p}` ({len(n)} linear layers)" for p, n in parts.items()) + ".")
    if config.ratio is not None:
        lines[-1] += f" Parameter budget: remove {config.ratio:g} of the targeted layers' parameters"
        lines[-1] += f" (allocation `{config.alloc or 'method default'}`)." if config.family == "lowrank" else "."
    avg_bits = getattr(config, "avg_bits", None)
    if config.bits or avg_bits:
        what = "weights" if config.family == "quant" else "low-rank factors"
        widths = f"{config.bits}-bit" if config.bits else _mixed_widths(model, avg_bits, config.bit_choices)
        group_opts = getattr(config, "group_choices", None) if avg_bits else None
        group = (f"group sizes per layer from {list(group_opts)}" if group_opts and group_opts != [config.group_size]
                 else f"group size {config.group_size}")
        lines.append(f"Quantization of the {what}: {widths}, {group}, scales and "
                     f"zeros in {config.scale_dtype}" + (f", EoRA compensation rank {config.eora_rank}"
                                                         if config.eora_rank else "")
                     + (f", EoRA compensation with per-layer ranks from a budget of {config.eora_bits:g} extra bits "
                        "per weight" if getattr(config, "eora_bits", None) else "")
                     + (f", EoRA factors stored as {config.eora_factor_bits}-bit codes (group size "
                        f"{config.eora_factor_group_size})" if getattr(config, "eora_factor_bits", None) else "")
                     + ".")
    cal = config.calibration or {}
    if cal.get("source"):
        lines.append(f"Calibration: {cal.get('nsamples')} windows of {cal.get('seqlen')} tokens of "
                     f"`{cal.get('source')}` (seed {cal.get('seed')}).")
    lines.append("")
    lines.append("| layer type | layers | shape (out×in) | form | rank | bits | bits per weight | bytes now | bytes dense |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for g in groups:
        rs = g["rows"]
        bpw = sum(r.bits_per_weight for r in rs) / len(rs)
        lines.append(f"| `{g['type']}` | {len(rs)} | {', '.join(sorted(g['shapes']))} | {', '.join(sorted(g['kinds']))} "
                     f"| {_range(g['ranks']) if g['ranks'] else '–'} | {', '.join(sorted(g['bits'])) or '–'} "
                     f"| {bpw:.2f} | {_fmt_bytes(sum(r.bytes for r in rs))} | {_fmt_bytes(sum(r.dense_bytes for r in rs))} |")
    lines.append("")
    lines.append("Bits per weight count every stored tensor of a layer (factors, packed codes, scales, zeros) except "
                 "its bias, over the weights of the dense layer it replaces.")
    return "\n".join(lines)


def _size_section(sizes: dict, checkpoint_bytes: int | None, coverage: Coverage) -> str:
    s = sizes
    lines = ["| | dense | compressed | ratio |", "|---|---|---|---|",
             f"| compressed layers | {_fmt_bytes(s['compressed_dense'])} | {_fmt_bytes(s['compressed_now'])} | "
             f"{s['compressed_now'] / max(s['compressed_dense'], 1):.3f} |",
             f"| whole model (in memory) | {_fmt_bytes(s['total_dense'])} | {_fmt_bytes(s['total_now'])} | "
             f"{s['total_now'] / max(s['total_dense'], 1):.3f} |", ""]
    lines.append(f"Parameters now: {s['params']:,} (`nn.Parameter`s; packed codes, scales and zeros are buffers). Left "
                 f"dense, in bytes: linear layers {_fmt_bytes(s['other_linear'])}, every other tensor (embeddings, "
                 f"norms, weights outside linear layers) {_fmt_bytes(s['other'])}.")
    if checkpoint_bytes:
        lines.append(f"Checkpoint files: {checkpoint_bytes:,} bytes of safetensors.")
    lines += ["", _coverage_section(coverage)]
    return "\n".join(lines)


def _coverage_section(coverage: Coverage) -> str:
    """The parameters by kind, compressed and left dense, and the large weights no method could take."""
    lines = ["### Coverage by kind", "",
             "Every parameter of the model, by kind; a compressed layer counts as the dense layer it replaces "
             "(out × in weights plus its bias), so the total is the dense model's parameter count."
             + (" Routers stay dense by default (a router's rounding error changes which experts run)."
                if coverage["router"].total else ""), "",
             coverage.markdown_table()]
    if coverage.uncompressible:
        lines += ["", "Large weights of the repeated blocks that stay dense because no hf-compress method can compress "
                      "them:", ""]
        lines += [f"- `{w.name}` {list(w.shape)}: {100 * w.share:.1f} % of the parameters of {w.block}"
                  for w in group_dense_weights(coverage.uncompressible)]
    return "\n".join(lines)


def _eval_section(evals: list[dict], fingerprint: str | None) -> tuple[str, list]:
    from huggingface_hub import EvalResult

    mine = [r for r in evals if r["role"] == "compressed" and r.get("fingerprint") == fingerprint]
    stale = [r for r in evals if r["role"] == "compressed" and r.get("fingerprint") != fingerprint]
    base = {(r["dataset"], r.get("seqlen"), r.get("max_tokens")): r for r in evals if r["role"] == "base"}
    if not mine:
        text = ("No evaluation of these weights has been recorded. Run `hf-compress eval DIR --text FILE` (or "
                "`hf-compress compress ... --eval-text FILE`) and regenerate the card.")
        if stale:
            text += (f" ({len(stale)} recorded evaluation(s) measured other weights, e.g. before a fine-tune, and "
                     "are not shown.)")
        return text, []
    lines = ["| dataset | metric | base model | this model | KV cache | protocol |", "|---|---|---|---|---|---|"]
    results = []
    for r in mine:
        b = base.get((r["dataset"], r.get("seqlen"), r.get("max_tokens")))
        kv = "default" if not r.get("kv") else f"`{json.dumps(r['kv'])}`"
        base_value = f"{b['value']:.4g}" if b else "–"
        lines.append(f"| {r['dataset']} | {r['metric']} | {base_value} | {r['value']:.4g} | {kv} | "
                     + PROTOCOL.format(**{k: r.get(k) for k in ("max_tokens", "seqlen", "tokens")}) + " |")
        results.append(EvalResult(task_type="text-generation", dataset_type=r["dataset"], dataset_name=r["dataset"],
                                  metric_type=r["metric"], metric_value=round(r["value"], 4),
                                  dataset_split="test" if "test" in r["dataset"] else None))
    commands = sorted({r["command"] for r in mine + list(base.values()) if r.get("command")})
    if commands:
        lines += ["", "Measured with:", "", "```bash", *commands, "```"]
    lines += ["", f"Weights fingerprint of these results: `{fingerprint}` (`hf_compress.hub.weights_fingerprint`)."]
    return "\n".join(lines), results


def _kv_section(config) -> str:
    if not config.kv:
        return ""
    return (f"`generate()` uses a compressed KV cache by default: `{json.dumps(config.kv)}` "
            "(an explicit `past_key_values=` still wins).")


def _provenance_section(prov: dict) -> str:
    lines = []
    if prov.get("base_model"):
        lines.append(f"Base model: [{prov['base_model']}](https://huggingface.co/{prov['base_model']}).")
    else:
        lines.append("Base model: not recorded (pass `--base-model` to `hf-compress compress`/`push`).")
    if prov.get("command"):
        lines += ["", "Compressed with:", "", "```bash", prov["command"], "```"]
    return "\n".join(lines)


def _auto_class(model) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = type(model).__name__
    return "AutoModelForCausalLM" if arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else "AutoModel"


def model_card(model: nn.Module, *, repo_id: str | None = None, evaluations: list[dict] | None = None,
               base_model: str | None = None, license: str | None = None, tags: list[str] | None = None,
               plot: str | None = PLOT_FILE, checkpoint_bytes: int | None = None, has_tokenizer: bool = True):
    """The `huggingface_hub.ModelCard` of a compressed model (not written anywhere; see `write_model_card`)."""
    from huggingface_hub import ModelCard, ModelCardData

    config = getattr(model.config, "quantization_config", None)
    if not hasattr(config, "method"):
        raise ConfigError("model_card needs a model compressed with hf-compress.")
    prov = {**(config.provenance or {})}
    if base_model:
        prov["base_model"] = base_model
    if license:
        prov["license"] = license
    evals = evaluations if evaluations is not None else list(model_evaluations(model))
    # hashing every weight costs a pass over the model: only when there are records to match
    fingerprint = weights_fingerprint(model) if any(r["role"] == "compressed" for r in evals) else None
    eval_text, eval_results = _eval_section(evals, fingerprint)
    groups = layer_groups(model)
    methods = [config.method] + ([f"{config.bits}-bit"] if config.bits else ["mixed-precision"]
                                 if getattr(config, "avg_bits", None) else []) + \
        ([config.kv["method"] + "-kv-cache"] if config.kv else [])
    all_tags = ["hf-compress", "compressed", config.family, *methods, *(tags or []),
                *(getattr(model, "model_tags", None) or [])]
    name = repo_id.split("/")[-1] if repo_id else f"{(prov.get('base_model') or type(model).__name__).split('/')[-1]}-hf-compress"
    auto_class = _auto_class(model)
    data = ModelCardData(
        base_model=prov.get("base_model"), library_name=LIBRARY_NAME, license=prov.get("license"),
        language=prov.get("language"), tags=list(dict.fromkeys(all_tags)),
        pipeline_tag="text-generation" if auto_class == "AutoModelForCausalLM" else None,
        model_name=name, eval_results=eval_results or None,
        **({"base_model_relation": "quantized"} if prov.get("base_model") and config.family == "quant" else {}))
    sizes = size_breakdown(model)
    cfg = config.to_dict()
    cfg.pop("modules", None)
    origin = (f"[{prov['base_model']}](https://huggingface.co/{prov['base_model']})" if prov.get("base_model")
              else "its base model")
    coverage = coverage_report(model, skip=config.skip)
    summary = (f"A compressed version of {origin} "
               f"made with [hf-compress](https://pypi.org/project/hf-compress/): method `{config.method}`, "
               f"compressed layers at {sizes['compressed_now'] / max(sizes['compressed_dense'], 1):.3f}× their dense "
               f"bytes, whole model at {sizes['total_now'] / max(sizes['total_dense'], 1):.3f}×; "
               f"{100 * coverage.compressed / max(coverage.total, 1):.1f} % of the parameters compressed "
               "(by kind: see Size).")
    template = resources.files("hf_compress.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        data, template_str=template, model_name=name, summary=summary, repo_id=repo_id or "<your-user>/<repo>",
        auto_class=auto_class, architecture=type(model).__name__, has_tokenizer=has_tokenizer,
        compressed_section=_compressed_section(model, config, groups),
        size_section=_size_section(sizes, checkpoint_bytes, coverage), plot=plot,
        plot_quantity="rank" if config.family == "lowrank" and not config.bits else "bits per weight",
        eval_section=eval_text, kv_section=_kv_section(config), provenance_section=_provenance_section(prov),
        config_json=json.dumps(cfg, indent=2, sort_keys=True), version=__version__)


def write_model_card(model: nn.Module, directory: str | os.PathLike, *, repo_id: str | None = None,
                     evaluations: list[dict] | None = None, base_model: str | None = None,
                     license: str | None = None, tags: list[str] | None = None) -> Path:
    """(Re)write ``README.md`` and the plot in ``directory`` (a checkpoint folder) for ``model``; any previous card
    there is replaced as a whole. Evaluations default to the folder's ``hf_compress_eval.json`` plus the model's."""
    directory = Path(directory)
    if evaluations is None:
        evaluations = merge_evaluations(load_evaluations(directory), model_evaluations(model))
    plotted = plot_layers(model, directory / PLOT_FILE)
    ckpt = sum(f.stat().st_size for f in directory.glob("*.safetensors")) or None
    has_tok = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    card = model_card(model, repo_id=repo_id, evaluations=evaluations, base_model=base_model, license=license,
                      tags=tags, plot=PLOT_FILE if plotted else None, checkpoint_bytes=ckpt, has_tokenizer=has_tok)
    with atomic_file(directory / CARD_FILE, prefix=".README.") as tmp:
        card.save(tmp)
    return directory / CARD_FILE
