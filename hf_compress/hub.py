"""Publishing a compressed model: measured evaluation records, the generated model card and its plot, and
``push_to_hub`` through ``huggingface_hub``.

* **Evaluation records** (``hf_compress_eval.json`` beside the checkpoint) carry a fingerprint of the weights they
  were measured on. The card shows a number only when its fingerprint matches the weights being published, so a
  model fine-tuned or re-compressed after an evaluation never inherits that evaluation's numbers.
* **The card** is rendered from ``hf_compress/model_cards/hf_compress_card.md`` (installed as ``hf_compress.model_cards``)
  with `huggingface_hub.ModelCard` / `ModelCardData`; its tables come from the model itself
  (`hf_compress.summary.layer_table`), never from the config's intentions.
* **push**: `push_to_hub` saves (or takes a checkpoint folder), regenerates the card, and uploads the folder in one
  commit with `HfApi.upload_folder`. Compressed models get it as ``model.push_to_hub`` (bound per instance), so
  transformers' own README stub never replaces the card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from datetime import date
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

EVAL_FILE = "hf_compress_eval.json"
PLOT_FILE = "hf_compress_layers.png"
CARD_FILE = "README.md"
TEMPLATE = "hf_compress_card.md"
LIBRARY_NAME = "transformers"  # the checkpoint loads with transformers' Auto classes (plus the plugin)
#: GGUF files we know the Hub origin of (``hf_compress.loading`` loads them): file name -> base model id.
KNOWN_GGUF = {"SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}

PROTOCOL = ("perplexity of the first {max_tokens} tokens of the text cut into non-overlapping {seqlen}-token windows, "
            "each scored independently ({tokens} predicted tokens; `hf_compress.evaluation`)")


# --------------------------------------------------------------------------------------------- fingerprints


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every tensor in ``model.state_dict()`` (name, shape, float64 sum and sum of squares).

    Invariant under exact dtype upcasts (an fp16 checkpoint loaded in fp32 keeps its fingerprint); any change of
    the weights (fine-tuning, merging, re-compression) changes it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            continue
        x = t.detach().to(torch.float64)
        h.update(f"{name}|{tuple(t.shape)}|{x.sum().item():.9e}|{x.square().sum().item():.9e}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- evaluations


def evaluation_record(result, *, dataset: str, model: nn.Module | None = None, role: str = "compressed",
                      command: str | None = None, kv: dict | None = None) -> dict:
    """One evaluation as stored in ``hf_compress_eval.json``: a `PerplexityResult` (or its dict), what was scored
    (``dataset``: a file or dataset name) and on which weights (``model``'s fingerprint; ``role="base"`` for the
    uncompressed model the checkpoint was made from, which has no fingerprint to match)."""
    if role not in ("compressed", "base"):
        raise ConfigError(f"role must be 'compressed' or 'base', got {role!r}")
    r = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    record = {"role": role, "metric": "perplexity", "value": float(r["perplexity"]), "dataset": str(dataset),
              "tokens": r.get("tokens"), "windows": r.get("windows"), "seqlen": r.get("seqlen"),
              "max_tokens": r.get("max_tokens"), "kv": kv, "date": date.today().isoformat()}
    if command:
        record["command"] = command
    if role == "compressed":
        if model is None:
            raise ConfigError("A compressed-model evaluation needs the model it measured (for its fingerprint).")
        record["fingerprint"] = weights_fingerprint(model)
    return record


def _key(r: dict) -> tuple:
    return (r["role"], r["metric"], r["dataset"], r.get("seqlen"), r.get("max_tokens"), json.dumps(r.get("kv")),
            r.get("fingerprint"))


def merge_evaluations(old: list[dict], new: list[dict]) -> list[dict]:
    """Records of ``old`` and ``new``, a newer record replacing an older one of the same measurement."""
    merged = OrderedDict((_key(r), r) for r in old)
    for r in new:
        merged.pop(_key(r), None)
        merged[_key(r)] = r
    return list(merged.values())


def load_evaluations(directory: str | os.PathLike) -> list[dict]:
    path = Path(directory) / EVAL_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data["evaluations"]
        for r in records:
            _key(r)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it or re-run the evaluation.") from None
    return records


def save_evaluations(directory: str | os.PathLike, records: list[dict]) -> None:
    """Write ``hf_compress_eval.json`` atomically (a temporary file renamed into place)."""
    path = Path(directory) / EVAL_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{EVAL_FILE}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"hf_compress_version": __version__, "evaluations": records}, f, indent=2)
        _public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _public(path) -> None:
    """Give a file made by mkstemp (0600) the permissions of any file written normally (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def model_evaluations(model: nn.Module) -> list[dict]:
    """The evaluation records travelling with an in-memory compressed model (read from ``hf_compress_eval.json``
    when it was loaded, appended to by `add_evaluation`); saved beside it by `hf_compress.save_pretrained`."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        raise ConfigError("This model is not compressed with hf-compress; there is nowhere to record evaluations.")
    return quantizer.__dict__.setdefault("evaluations", [])


def add_evaluation(model: nn.Module, result, *, dataset: str, base: bool = False, command: str | None = None,
                   kv: dict | None = None) -> dict:
    """Record ``result`` (from `hf_compress.perplexity`) on the compressed ``model`` so its card shows it.

    ``base=True``: the result was measured on the uncompressed model before compression (shown beside it)."""
    record = evaluation_record(result, dataset=dataset, model=None if base else model,
                               role="base" if base else "compressed", command=command, kv=kv)
    evals = model_evaluations(model)
    evals[:] = merge_evaluations(evals, [record])
    return record


# --------------------------------------------------------------------------------------------- provenance


def provenance_of(model: nn.Module) -> dict:
    """Where ``model`` came from, as far as can be known offline: ``base_model`` (a Hub id), ``license`` and
    ``language`` from the base model's card or GGUF metadata."""
    hint = getattr(model, "_hf_compress_provenance", None)  # set by hf_compress.loading for GGUF files
    if hint:
        return dict(hint)
    src = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))
    out: dict = {}
    readme = None
    if src and os.path.isdir(src):
        m = re.search(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots[/\\]", src)
        if m:  # a Hub-cache snapshot folder
            out["base_model"] = f"{m[1]}/{m[2]}"
        readme = Path(src, CARD_FILE)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        out["base_model"] = src
        try:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(src, CARD_FILE, local_files_only=True))
        except Exception:  # not in the local cache: no network lookups here
            readme = None
    if readme is not None and readme.is_file():
        out.update(_card_metadata(readme))
    return out


def _card_metadata(readme: Path) -> dict:
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception as e:  # a README without (valid) metadata
        logger.info("No metadata read from %s: %s", readme, e)
        return {}
    out = {}
    if getattr(data, "license", None):
        out["license"] = data.license
    if getattr(data, "language", None):
        out["language"] = data.language
    return out


def gguf_provenance(path: str | os.PathLike) -> dict:
    """``license`` / ``language`` from a GGUF file's metadata and ``base_model`` for the GGUF files we know."""
    out = {}
    if Path(path).name in KNOWN_GGUF:
        out["base_model"] = KNOWN_GGUF[Path(path).name]
    try:
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        if "general.license" in fields:
            out["license"] = str(fields["general.license"].contents())
        if "general.languages" in fields:
            out["language"] = list(fields["general.languages"].contents())
    except Exception as e:
        logger.info("No GGUF metadata read from %s: %s", path, e)
    return out


# --------------------------------------------------------------------------------------------- the card


def _layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m[1]) if m else None


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _range(values) -> str:
    values = sorted(values)
    if values[0] == values[-1]:
        return str(values[0])
    return f"{values[0]}–{values[-1]} (mean {sum(values) / len(values):.1f})"


def layer_groups(model: nn.Module) -> list[dict]:
    """Compressed layers grouped by layer type (leaf name): count, shapes, form, rank/bits, bits/w, bytes."""
    from .modules import compressed_modules
    from .summary import layer_table

    modules = compressed_modules(model)
    groups: OrderedDict[str, dict] = OrderedDict()
    for r in layer_table(model):
        if r.kind == "dense":
            continue
        m = modules[r.name]
        g = groups.setdefault(_layer_type(r.name), {"type": _layer_type(r.name), "rows": [], "kinds": set(),
                                                     "shapes": set(), "ranks": [], "bits": set()})
        g["rows"].append(r)
        g["kinds"].add(r.kind)
        g["shapes"].add(f"{r.shape[0]}×{r.shape[1]}")
        if getattr(m, "rank", 0):
            g["ranks"].append(int(m.rank))
        if getattr(m, "bits", None):
            g["bits"].add(f"{m.bits}-bit g{m.group_size}")
    return list(groups.values())


def _compressed_section(model, config, groups) -> str:
    from .summary import layer_table

    rows = layer_table(model)
    n_comp = sum(r.kind != "dense" for r in rows)
    lines = [f"{n_comp} of {len(rows)} linear layers are compressed "
             f"(method `{config.method}`, family {config.family})."]
    try:
        from .targets import find_targets

        kept = len(find_targets(model, config.targets, config.skip))  # targeted layers that are still dense
    except Exception:
        kept = 0
    if kept:
        lines[-1] += (f" {kept} targeted layers stayed dense: the rank allocation found that factorising them would "
                      "not pay for its error (or not save bytes).")
    if config.ratio is not None:
        lines[-1] += f" Parameter budget: remove {config.ratio:g} of the targeted layers' parameters"
        lines[-1] += f" (allocation `{config.alloc or 'method default'}`)." if config.family == "lowrank" else "."
    if config.bits:
        what = "weights" if config.family == "quant" else "low-rank factors"
        lines.append(f"Quantization of the {what}: {config.bits}-bit, group size {config.group_size}, scales and "
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


def size_breakdown(model: nn.Module) -> dict:
    """Bytes now and dense-equivalent: compressed layers, dense linear layers, everything else (embeddings, ...)."""
    from .summary import layer_table, model_bytes

    rows = layer_table(model)
    comp_now = sum(r.bytes for r in rows if r.kind != "dense")
    comp_dense = sum(r.dense_bytes for r in rows if r.kind != "dense")
    # a dense layer's tensors shared with another module (a head tied to the embeddings) count as "other"
    holders: dict[int, int] = {}
    for m in model.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            holders[t.data_ptr()] = holders.get(t.data_ptr(), 0) + 1
    linear_dense = 0
    for r in rows:
        if r.kind == "dense":
            m = model.get_submodule(r.name)
            linear_dense += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())
                                if holders.get(t.data_ptr(), 0) <= 1)
    total = model_bytes(model)
    other = total - comp_now - linear_dense
    return {"compressed_now": comp_now, "compressed_dense": comp_dense, "other_linear": linear_dense,
            "other": max(other, 0), "total_now": total, "total_dense": total - comp_now + comp_dense,
            "params": sum(p.numel() for p in model.parameters())}


def _size_section(sizes: dict, checkpoint_bytes: int | None) -> str:
    s = sizes
    lines = ["| | dense | compressed | ratio |", "|---|---|---|---|",
             f"| compressed layers | {_fmt_bytes(s['compressed_dense'])} | {_fmt_bytes(s['compressed_now'])} | "
             f"{s['compressed_now'] / max(s['compressed_dense'], 1):.3f} |",
             f"| whole model (in memory) | {_fmt_bytes(s['total_dense'])} | {_fmt_bytes(s['total_now'])} | "
             f"{s['total_now'] / max(s['total_dense'], 1):.3f} |", ""]
    lines.append(f"Parameters now: {s['params']:,}. Unchanged: linear layers left dense "
                 f"{_fmt_bytes(s['other_linear'])}; embeddings, norms and tied heads {_fmt_bytes(s['other'])}.")
    if checkpoint_bytes:
        lines.append(f"Checkpoint files: {checkpoint_bytes:,} bytes of safetensors.")
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
    methods = [config.method] + ([f"{config.bits}-bit"] if config.bits else []) + \
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
    summary = (f"A compressed version of {origin} "
               f"made with [hf-compress](https://pypi.org/project/hf-compress/): method `{config.method}`, "
               f"compressed layers at {sizes['compressed_now'] / max(sizes['compressed_dense'], 1):.3f}× their dense "
               f"bytes, whole model at {sizes['total_now'] / max(sizes['total_dense'], 1):.3f}×.")
    template = resources.files("hf_compress.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        data, template_str=template, model_name=name, summary=summary, repo_id=repo_id or "<your-user>/<repo>",
        auto_class=auto_class, architecture=type(model).__name__, has_tokenizer=has_tokenizer,
        compressed_section=_compressed_section(model, config, groups),
        size_section=_size_section(sizes, checkpoint_bytes), plot=plot,
        plot_quantity="rank" if config.family == "lowrank" and not config.bits else "bits per weight",
        eval_section=eval_text, kv_section=_kv_section(config), provenance_section=_provenance_section(prov),
        config_json=json.dumps(cfg, indent=2, sort_keys=True), version=__version__)


def plot_layers(model: nn.Module, path: str | os.PathLike) -> bool:
    """PNG: rank (low-rank models) or bits per weight of every compressed layer by block, per layer type, and the
    size breakdown dense vs compressed. Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'hf-compress[hub]'): the card has no plot.")
        return False
    from .modules import compressed_modules
    from .summary import layer_table

    config = model.config.quantization_config
    use_rank = config.family == "lowrank" and not config.bits
    modules = compressed_modules(model)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    series: OrderedDict[str, dict] = OrderedDict()
    for i, r in enumerate(x for x in layer_table(model) if x.kind != "dense"):
        y = modules[r.name].rank if use_rank else r.bits_per_weight
        b = _block_index(r.name)
        series.setdefault(_layer_type(r.name), {})[i if b is None else b] = y
    xs = sorted({x for pts in series.values() for x in pts})
    for kind, pts in series.items():  # NaN where a block's layer stayed dense: the line breaks there
        ax.plot(xs, [pts.get(x, float("nan")) for x in xs], marker="o", ms=3, lw=1, label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("rank" if use_rank else "bits per weight")
    ax.set_title(("rank" if use_rank else "bits per weight") + " of each compressed layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    s = size_breakdown(model)
    mib = 2**20
    parts = [("compressed layers", s["compressed_dense"], s["compressed_now"]),
             ("dense linear layers", s["other_linear"], s["other_linear"]),
             ("embeddings, norms, tied head", s["other"], s["other"])]
    left = [0.0, 0.0]
    for label, dense_b, now_b in parts:
        vals = [dense_b / mib, now_b / mib]
        bx.barh(["dense", "compressed"], vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    bx.set_xlabel("MiB")
    bx.set_title("model size")
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    fd, tmp = tempfile.mkstemp(prefix=".README.", dir=directory)
    os.close(fd)
    try:
        card.save(tmp)
        _public(tmp)
        os.replace(tmp, directory / CARD_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / CARD_FILE


# --------------------------------------------------------------------------------------------- push


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "hf_compress"
    except json.JSONDecodeError:
        return False


def push_to_hub(model_or_dir, repo_id: str, *, tokenizer=None, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, create_pr: bool = False, max_shard_size: int | str = "50GB",
                tags: list[str] | None = None, base_model: str | None = None, license: str | None = None):
    """Upload a compressed model (in memory, or a checkpoint folder written by hf-compress) to the Hub in one
    commit: safetensors weights, config with the ``hf_compress_autoload.py`` shim, tokenizer (when given or in the
    folder), generation config, evaluation records and a freshly generated model card with its plot.

    A folder gets its card regenerated in place first. Remote ``*.safetensors`` files not in this upload (stale
    shards of an earlier push) are deleted by the same commit. Returns the ``CommitInfo``."""
    from huggingface_hub import HfApi

    from .saving import save_pretrained

    api = HfApi(library_name="hf-compress", library_version=__version__)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_dir, (str, os.PathLike)):
            folder = Path(model_or_dir)
            if not is_checkpoint_dir(folder):
                raise CheckpointError(f"{folder} is not an hf-compress checkpoint folder (no config.json with "
                                      "model_type 'hf_compress').")
            from .loading import load_model

            model, _ = load_model(folder, dtype="auto")
        else:
            model = model_or_dir
            folder = Path(tmp) / "checkpoint"
            save_pretrained(model, folder, tokenizer=tokenizer, max_shard_size=max_shard_size, model_card=False)
        write_model_card(model, folder, repo_id=repo_id, base_model=base_model, license=license, tags=tags)
        repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo, folder_path=str(folder), commit_message=commit_message or "Upload hf-compress checkpoint",
            commit_description=commit_description, token=token, revision=revision, create_pr=create_pr,
            ignore_patterns=[".tmp-*", ".old-*", ".README.*", f".{EVAL_FILE}.*"],
            delete_patterns=["*.safetensors", "*.safetensors.index.json"])


class _PushToHub:
    """``model.push_to_hub`` of a compressed model: `push_to_hub` with the model bound. An object rather than a bound
    method so that it survives ``copy.deepcopy`` and pickling (``torch.save(model)``) still bound to its model."""

    __doc__ = push_to_hub.__doc__

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, repo_id: str, **kwargs):
        return push_to_hub(self.model, repo_id, **kwargs)


def bind(model: nn.Module) -> None:
    """Give a compressed model our ``push_to_hub`` (transformers' would replace the card with its README stub)."""
    model.push_to_hub = _PushToHub(model)


def unbind(model: nn.Module) -> None:
    model.__dict__.pop("push_to_hub", None)
