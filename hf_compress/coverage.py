"""What share of a model hf-compress compressed, by kind of weight — and which large weights no method could take.

`coverage_report(model)` classifies every parameter of a model (dense or compressed; tied tensors once) into a
kind — ``attention``, ``dense MLP``, ``experts``, ``shared experts``, ``router``, ``embeddings/head``, ``other`` —
and counts, per kind, the parameters, those compressed and those left dense. A compressed layer counts as the dense
layer it replaces (out × in weights, plus its bias), so the totals sum to the model's parameter count before
compression, whatever was compressed (but for an ``lm_head`` tied to the input embeddings that compression untied:
it then counts beside the embeddings). The classification follows the modules' types and structure, not one
architecture's names:

* ``experts``: inside a `CompressedExperts` or a transformers fused ``*Experts`` module (`is_fused_experts`), or
  inside a module named ``experts`` (the per-expert MLPs of older layouts);
* ``router``: `hf_compress.targets.routers` (the linear siblings of an experts module), modules whose class name
  ends in ``Router``, and the ``gate`` / ``router`` sibling of an experts module;
* ``shared experts``: a sibling of an experts module named ``shared_expert`` / ``shared_experts`` (or
  ``shared_mlp``);
* ``embeddings/head``: ``get_input_embeddings()``, ``get_output_embeddings()`` and every ``nn.Embedding``;
* ``attention``: inside a module whose class name contains ``Attention`` (a whole decoder layer named after its
  attention excepted) or that is named ``self_attn``, ``attention``, ``attn``, ``linear_attn``, ... ;
* ``dense MLP``: the other linear layers (and other weight matrices) of the repeated blocks (``mlp``,
  ``feed_forward``, ...);
* ``other``: norms, convolutions, loose vectors (biases outside layers, attention sinks, ...) and the layers outside
  the repeated blocks that are none of the above (a BERT pooler).

`Coverage.uncompressible` names the large weights of the repeated blocks that stay dense because no method can take
them (a >= 2-D parameter holding at least `LARGE_SHARE` of its block's parameters that is not in a linear layer, a
fused experts module, a router or a norm, and that the user did not skip) — for instance the 3-D weights of an
experts module whose layout hf-compress does not know. `compress` logs the report at INFO and warns about those;
the CLI's ``compress`` summary, ``hf-compress info`` and the model card show the table.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from .modules import CompressedModule
from .modules.experts import CompressedExperts, ExpertLinears, is_fused_experts

logger = logging.getLogger(__name__)

KINDS = ("attention", "dense MLP", "experts", "shared experts", "router", "embeddings/head", "other")
#: the heading the CLI and the log put above `Coverage.format_table`
TITLE = "coverage by kind (parameters; a compressed layer counts as the dense layer it replaces):"
#: a dense >= 2-D weight of a block holding at least this share of the block's parameters is named in a warning
LARGE_SHARE = 0.01

_ATTENTION_NAMES = {"self_attn", "attention", "attn", "linear_attn", "self_attention", "cross_attn",
                    "cross_attention", "encoder_attn", "crossattention"}
_SHARED_NAMES = re.compile(r"shared_experts?|shared_mlp")
_ROUTER_NAMES = {"gate", "router"}
_LINEAR = (nn.Linear, Conv1D)


@dataclass
class KindCoverage:
    """Parameters of one kind (dense-equivalent): ``total``, of which ``compressed``."""

    kind: str
    total: int = 0
    compressed: int = 0

    @property
    def dense(self) -> int:
        """Parameters of this kind left dense."""
        return self.total - self.compressed

    @property
    def fraction(self) -> float | None:
        """Share compressed (None when the model has no parameter of this kind)."""
        return self.compressed / self.total if self.total else None


@dataclass(frozen=True)
class Entry:
    """One parameter (or one compressed layer, as the dense layer it replaces) and how it was classified."""

    name: str  # the parameter's name; a compressed layer's module name
    kind: str
    params: int  # dense-equivalent
    shape: tuple[int, ...]
    compressed: bool
    compressible: bool  # in a layer some method can compress (linear, experts weights)
    norm: bool
    block: str | None  # the repeated block that holds it


@dataclass(frozen=True)
class DenseWeight:
    """A large weight of a repeated block that stays dense because no method can compress it."""

    name: str
    shape: tuple[int, ...]
    params: int
    block: str
    share: float  # of the block's parameters

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} ({100 * self.share:.1f} % of the parameters of {self.block})"


@dataclass
class Coverage:
    """Parameters by kind (`KINDS`): total, compressed, left dense; plus the large uncompressible weights."""

    kinds: dict[str, KindCoverage]
    entries: list[Entry] = field(repr=False, default_factory=list)
    uncompressible: list[DenseWeight] = field(default_factory=list)
    #: parameters removed by ``expert_prune`` (not in the model any more, not in ``total``)
    pruned: int = 0

    @property
    def total(self) -> int:
        """All parameters, dense-equivalent (the dense model's parameter count)."""
        return sum(k.total for k in self.kinds.values())

    @property
    def compressed(self) -> int:
        return sum(k.compressed for k in self.kinds.values())

    @property
    def dense(self) -> int:
        return self.total - self.compressed

    def __getitem__(self, kind: str) -> KindCoverage:
        return self.kinds[kind]

    def to_dict(self) -> dict:
        return {"kinds": {k: {"total": c.total, "compressed": c.compressed, "dense": c.dense}
                          for k, c in self.kinds.items()},
                "total": self.total, "compressed": self.compressed, "dense": self.dense,
                "uncompressible": [{"name": w.name, "shape": list(w.shape), "params": w.params, "block": w.block,
                                    "share": w.share} for w in self.uncompressible],
                **({"pruned": self.pruned} if self.pruned else {})}

    def _rows(self):
        rows = [(c.kind, c.total, c.fraction, c.dense) for c in self.kinds.values() if c.total]
        return rows + [("total", self.total, self.compressed / self.total if self.total else None, self.dense)]

    def format_table(self) -> str:
        """Plain-text table: kind, parameters (dense-equivalent), compressed %, parameters left dense."""
        lines = [f"{'kind':<16} {'parameters':>14} {'compressed':>11} {'left dense':>14}"]
        for kind, total, frac, dense in self._rows():
            lines.append(f"{kind:<16} {total:>14,} {_pct(frac):>11} {dense:>14,}")
        lines += [f"large weight left dense (no method can compress it): {w.describe()}"
                  for w in group_dense_weights(self.uncompressible)]
        if self.pruned:
            lines.append(f"experts pruned (expert_prune; removed, not in the total): {self.pruned:,} parameters")
        return "\n".join(lines)

    def markdown_table(self) -> str:
        """The same table in Markdown (the model card)."""
        lines = ["| kind | parameters | compressed | left dense |", "|---|---:|---:|---:|"]
        for kind, total, frac, dense in self._rows():
            b = "**" if kind == "total" else ""
            lines.append(f"| {b}{kind}{b} | {b}{total:,}{b} | {b}{_pct(frac)}{b} | {b}{dense:,}{b} |")
        if self.pruned:
            lines.append(f"| experts pruned (removed, not in the total) | {self.pruned:,} | | |")
        return "\n".join(lines)


def _pct(frac: float | None) -> str:
    return "–" if frac is None else f"{100 * frac:.1f} %"


def block_of(name: str) -> str | None:
    """The repeated block (``model.layers.3``) that holds ``name``, as `hf_compress.targets` finds blocks (a numeric
    name component with something below it); None outside the blocks."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return None


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
        "norm" in type(module).__name__.lower()


def _is_experts(name: str, module: nn.Module) -> bool:
    return (isinstance(module, CompressedExperts) or is_fused_experts(module)
            or (name.rpartition(".")[2] == "experts" and not isinstance(module, _LINEAR)))


def _structure(model: nn.Module) -> tuple[set[str], set[str], set[str]]:
    """Names of the experts modules, of the router modules and of the shared-experts modules of ``model``."""
    from .targets import routers

    experts, router, shared = set(), set(routers(model)), set()
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Router"):
            router.add(name)
        children = dict(module.named_children())
        prefix = f"{name}." if name else ""
        if any(_is_experts(prefix + k, c) for k, c in children.items()):
            for k, c in children.items():
                if _is_experts(prefix + k, c):
                    experts.add(prefix + k)
                elif k in _ROUTER_NAMES:
                    router.add(prefix + k)
                elif _SHARED_NAMES.fullmatch(k):
                    shared.add(prefix + k)
    return experts, router, shared


def _location(name: str, module: nn.Module, parent: str | None, experts, router, shared) -> str | None:
    """The kind a module's weights get from where it sits (None: no special place)."""
    if name in experts or parent == "experts":
        return "experts"
    if name in router or parent == "router":
        return "router"
    if name in shared or parent == "shared experts":
        return "shared experts"
    cls = type(module).__name__  # (not a whole decoder layer named after its attention: BambaAttentionDecoderLayer)
    if (parent == "attention" or name.rpartition(".")[2] in _ATTENTION_NAMES
            or ("Attention" in cls and not cls.endswith(("Layer", "Block")))):
        return "attention"
    return None


def classify(model: nn.Module) -> list[Entry]:
    """Every parameter of ``model`` (tied tensors once; a compressed layer once, as its dense-equivalent out × in
    weights plus bias), in model order, with its kind."""
    experts, router, shared = _structure(model)
    emb = {id(m) for m in (getattr(model, "get_input_embeddings", lambda: None)(),
                           getattr(model, "get_output_embeddings", lambda: None)()) if m is not None}
    where: dict[str, str | None] = {}
    inside = None  # the compressed layer whose parts follow (named_modules is a pre-order walk)
    seen: set[int] = set()
    entries: list[Entry] = []
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0] if name else None
        loc = _location(name, module, where.get(parent) if parent is not None else None, experts, router, shared)
        where[name] = loc
        if inside is not None and name.startswith(inside):
            continue
        block = block_of(name + ".") if name else None
        if isinstance(module, CompressedModule):
            inside = name + "."
            n = module.out_features * module.in_features + (0 if module.bias is None else module.bias.numel())
            seen.update(id(p) for p in module.parameters())
            kind = "embeddings/head" if id(module) in emb else (loc or ("dense MLP" if block else "other"))
            entries.append(Entry(name, kind, n, (module.out_features, module.in_features), True, True, False, block))
            continue
        linear = isinstance(module, _LINEAR)
        norm = not linear and is_norm(module)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{name}.{pname}" if name else pname
            fused = loc == "experts" and (isinstance(module, (CompressedExperts, ExpertLinears)) or is_fused_experts(module))
            if id(module) in emb or isinstance(module, nn.Embedding):
                kind = "embeddings/head"
            elif norm or isinstance(module, nn.modules.conv._ConvNd):
                kind = "other"
            elif loc in ("router", "experts") or (linear and loc):
                kind = loc
            elif linear:
                kind = "dense MLP" if block else "other"
            elif p.dim() >= 2:  # a weight matrix outside the known layer types: where it sits
                kind = loc or ("dense MLP" if block else "other")
            else:  # loose vectors: biases outside layers, sinks, gates' scalars
                kind = "other"
            entries.append(Entry(full, kind, p.numel(), tuple(p.shape), False, linear or fused, norm, block))
    return entries


def coverage_report(model: nn.Module, skip: list[str] | None = None, pruned: int | None = None) -> Coverage:
    """Parameters of ``model`` by kind (`KINDS`), compressed and left dense, and the large weights of its blocks
    that no method can compress (`Coverage.uncompressible`; those matching a ``skip`` pattern — default: the skip
    list of the model's hf-compress config — are left out). Works on dense and compressed models alike."""
    from .targets import _self_and_ancestors, matches

    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if skip is None:
        skip = list(getattr(qconfig, "skip", None) or [])
    if pruned is None:  # expert_prune's record (a loaded checkpoint's config: a dict or the config object)
        record = qconfig.get("pruned_experts") if isinstance(qconfig, dict) else getattr(qconfig, "pruned_experts", None)
        pruned = (record or {}).get("parameters", 0)
    entries = classify(model)
    kinds = {k: KindCoverage(k) for k in KINDS}
    per_block: dict[str, int] = {}
    for e in entries:
        kinds[e.kind].total += e.params
        kinds[e.kind].compressed += e.params if e.compressed else 0
        if e.block:
            per_block[e.block] = per_block.get(e.block, 0) + e.params
    large = []
    for e in entries:
        if (e.block is None or e.compressed or e.compressible or e.norm or len(e.shape) < 2
                or e.kind in ("router", "embeddings/head") or e.params < LARGE_SHARE * per_block[e.block]):
            continue
        if any(matches(a, p) for a in _self_and_ancestors(e.name) for p in skip):
            continue
        large.append(DenseWeight(e.name, e.shape, e.params, e.block, e.params / per_block[e.block]))
    return Coverage(kinds, entries, large, pruned)


def group_dense_weights(weights: list[DenseWeight]) -> list[DenseWeight]:
    """The same weight of every block as one line: ``model.layers.*.mlp.w`` with its block count in ``block``."""
    groups: dict[tuple, list[DenseWeight]] = {}
    for w in weights:
        generic = w.block.rpartition(".")[0] + ".*" if "." in w.block else "*"
        key = (generic + w.name[len(w.block):], w.shape)
        groups.setdefault(key, []).append(w)
    out = []
    for (name, shape), ws in groups.items():
        if len(ws) == 1:
            out.append(ws[0])
        else:
            share = max(w.share for w in ws)
            out.append(DenseWeight(name, shape, sum(w.params for w in ws), f"each of {len(ws)} blocks", share))
    return out


def warn_uncompressible(coverage: Coverage) -> None:
    """One warning naming the large block weights that stay dense because no method can compress them."""
    if not coverage.uncompressible:
        return
    groups = group_dense_weights(coverage.uncompressible)
    total = sum(w.params for w in coverage.uncompressible)
    logger.warning(
        "%d large weight(s) of the repeated blocks stay dense because no hf-compress method can compress them "
        "(%s parameters, %.1f %% of the model; hf-compress compresses nn.Linear, GPT-2 Conv1D and transformers' "
        "fused experts): %s. They are counted as left dense in the coverage report; to leave them dense "
        "knowingly and silence this warning, add their modules to `skip`.",
        len(coverage.uncompressible), f"{total:,}", 100 * total / max(coverage.total, 1),
        "; ".join(w.describe() for w in groups[:8]) + (f"; and {len(groups) - 8} more" if len(groups) > 8 else ""))


def log_coverage(coverage: Coverage) -> None:
    """The report at INFO (`compress`), and the warning about uncompressible weights."""
    logger.info("%s\n%s", TITLE, coverage.format_table())
    warn_uncompressible(coverage)


__all__ = ["KINDS", "LARGE_SHARE", "TITLE", "Coverage", "DenseWeight", "Entry", "KindCoverage", "block_of", "classify",
           "coverage_report", "group_dense_weights", "log_coverage", "warn_uncompressible"]
