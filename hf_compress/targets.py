"""Which modules a config targets, and how to read a dense [out, in] weight out of each supported type.

`targets_of` returns `Target` objects: a name, the module, and a ``kind`` that says how the weight is read and
what replaces it (`hf_compress.factory.BUILDERS`): "linear" (nn.Linear) or "conv1d" (GPT-2's Conv1D). A new kind
of weight (the 3-D parameters of fused mixture-of-experts modules) is a new kind here and a new builder there.
Also here: the repeated blocks that group targets (`units`, `block_index`) and untying a tied ``lm_head``.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass

import torch
from accelerate.utils import align_module_device
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, NonFiniteWeightError, UnsupportedModuleError

logger = logging.getLogger(__name__)

SUPPORTED = (nn.Linear, Conv1D)
_BLOCK = re.compile(r"(^|\.)\d+\.")


def matches(name: str, pattern: str) -> bool:
    """PEFT-style: exact name or ``.``-suffix; globs with * ? [; ``re:`` for a full-match regex."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def routers(model: nn.Module) -> set[str]:
    """Names of the linear layers that route tokens in a mixture-of-experts block (``gate`` [E, H],
    ``shared_expert_gate`` [1, H]): the linear siblings of an experts module. They stay dense by default (a router's
    rounding error changes which experts run)."""
    from .modules.experts import CompressedExperts, is_fused_experts

    found = set()
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if any(isinstance(c, CompressedExperts) or is_fused_experts(c) for c in children.values()):
            prefix = f"{name}." if name else ""
            found.update(prefix + k for k, c in children.items() if isinstance(c, SUPPORTED))
    return found


def _expanded(name: str, module: nn.Module) -> dict[str, nn.Module] | None:
    """A container a target pattern may name as a whole — a `CompressedExperts` or one of its `ExpertLinears` —
    as its supported layers; None for any other module."""
    from .modules.experts import CompressedExperts, ExpertLinears

    if not isinstance(module, (CompressedExperts, ExpertLinears)):
        return None
    return {f"{name}.{n}": m for n, m in module.named_modules() if n and isinstance(m, SUPPORTED)}


def _unsupported(pattern: str, name: str, module: nn.Module) -> UnsupportedModuleError:
    """The error for a target pattern that names a module hf-compress cannot compress, with advice that holds."""
    inside = [n for n, m in module.named_modules() if n and isinstance(m, SUPPORTED)]
    if inside:
        advice = (f"target the linear layers inside it instead, e.g. '{name}.{inside[0]}' or the glob "
                  f"'{name}.*'")
    else:
        advice = "it holds no linear layer or experts weights, so it stays dense: remove the pattern"
    return UnsupportedModuleError(
        f"Target pattern {pattern!r} matches {name!r}, a {type(module).__name__}; hf-compress compresses nn.Linear, "
        f"GPT-2 Conv1D and the experts of mixture-of-experts blocks ({advice})."
    )


# ----------------------------------------------------------------------------------------------- modalities
def language_model(model: nn.Module) -> str | None:
    """The name of a multimodal model's language model: the smallest module that holds both the input embedding
    and a list of repeated blocks (``model.language_model`` of Gemma 3, LLaVA, Qwen2.5-VL), when linear layers other
    than the output embedding lie outside it (a vision tower, a projector). None for a text-only model (its language
    model is the whole model, or holds every linear layer but the head). Multimodal: the config has a sub-config
    other than ``text_config`` (``vision_config``, ``audio_config``)."""
    sub = getattr(getattr(model, "config", None), "sub_configs", None) or {}
    if not any(k != "text_config" for k in sub):
        return None
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_in() if get_in else None
    except (NotImplementedError, AttributeError):
        return None
    if emb is None:
        return None
    emb_name = next((n for n, m in model.named_modules() if m is emb), None)
    if emb_name is None:
        return None
    prefix = None
    parts = emb_name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:i])
        holder = model.get_submodule(name) if name else model
        if any(isinstance(m, nn.ModuleList) and len(m) and n for n, m in holder.named_modules()):
            prefix = name
            break
    if not prefix:
        return None
    return prefix if other_modalities(model, prefix) else None


def other_modalities(model: nn.Module, prefix: str | None = None) -> dict[str, list[str]]:
    """{part: its linear layers} of what lies outside the language model ``prefix`` (default: `language_model`) —
    ``model.vision_tower``, ``model.multi_modal_projector``, ``model.visual`` —, the output embedding excepted; {}
    for a text-only model."""
    prefix = language_model(model) if prefix is None else prefix
    if not prefix:
        return {}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out else None
    path = prefix.split(".")
    ancestors = {".".join(path[:i]) for i in range(len(path))}  # the language model's ancestors ("" included)
    parts: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED) or module is head or name.startswith(prefix + "."):
            continue
        bits = name.split(".")
        part = next(".".join(bits[:i]) for i in range(1, len(bits) + 1) if ".".join(bits[:i]) not in ancestors)
        parts.setdefault(part, []).append(name)
    return parts


def find_targets(model: nn.Module, targets: list[str] | None, skip: list[str],
                 vision: bool = False) -> dict[str, nn.Module]:
    """Modules to compress, in model order. Raises when a pattern matches nothing or an unsupported module.

    By default: every nn.Linear / Conv1D inside the repeated blocks (experts included, once split into per-expert
    layers by `hf_compress.modules.experts.split_experts`), except mixture-of-experts routers (`routers`) and the
    output embedding. In a multimodal model (`language_model`), only the language model's blocks, unless
    ``vision``: then also every linear layer of the parts outside it (`other_modalities`: the vision tower's blocks
    and the projector)."""
    found: dict[str, nn.Module] = {}
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if targets is None:
        routing = routers(model)
        language = language_model(model)
        outside = {n for names in other_modalities(model, language).values() for n in names} if language else set()
        for name, module in model.named_modules():
            if name in outside:
                if vision:
                    found[name] = module
                continue
            if (isinstance(module, SUPPORTED) and _BLOCK.search(name) and module is not output_embeddings
                    and name not in routing):
                found[name] = module
        if not found:
            raise ConfigError(
                f"No nn.Linear/Conv1D inside repeated blocks of {type(model).__name__}; pass targets explicitly."
            )
    else:
        hit = {p: False for p in targets}
        for name, module in model.named_modules():
            pats = [p for p in targets if name and matches(name, p)]
            if not pats:
                continue
            for p in pats:
                hit[p] = True
            if isinstance(module, SUPPORTED):
                found[name] = module
                continue
            expanded = _expanded(name, module)
            if expanded is None:
                raise _unsupported(pats[0], name, module)
            found.update(expanded)
        missing = [p for p, h in hit.items() if not h]
        if missing:
            raise ConfigError(f"Target pattern(s) {missing} match no module of {type(model).__name__}.")
    for name in [n for n in found if any(matches(a, p) for a in _self_and_ancestors(n) for p in skip)]:
        del found[name]  # a skipped module's layers are skipped with it (``experts``, ``self_attn``)
    if not found:
        raise ConfigError("Every targeted module is skipped: nothing to compress.")
    return found


def _self_and_ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise UnsupportedModuleError(f"Cannot read a dense weight from {type(module).__name__}")


def source_of(module: nn.Module) -> str:
    return "conv1d" if isinstance(module, Conv1D) else "linear"


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return module.out_features, module.in_features


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def kind_of(module: nn.Module) -> str:
    """The target kind of a supported module ("linear", "conv1d")."""
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise UnsupportedModuleError(f"Cannot read a dense weight from {type(module).__name__}")


@dataclass(frozen=True)
class Target:
    """One compressible weight of the model: ``name`` (the module's), the ``module``, and its ``kind``."""

    name: str
    module: nn.Module
    kind: str

    @classmethod
    def of(cls, name: str, module: nn.Module) -> "Target":
        return cls(name, module, kind_of(module))

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return shape_of(self.module)

    def weight(self, check: bool = True) -> torch.Tensor:
        return checked_weight(self.name, self.module, check)


def targets_of(model: nn.Module, targets: list[str] | None, skip: list[str],
               vision: bool = False) -> dict[str, Target]:
    """`find_targets` as `Target` objects, in model order."""
    return {n: Target.of(n, m) for n, m in find_targets(model, targets, skip, vision).items()}


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloaded the module's own weights (they sit on the meta device)."""
    return any(p.device.type == "meta" for p in module.parameters(recurse=False))


def checked_weight(name: str, module: nn.Module, check: bool = True) -> torch.Tensor:
    """The dense [out, in] weight, read through accelerate's offload hooks when the module is offloaded.
    ``check``: refuse NaN/Inf (`compress_modules` checks every target before it changes any, so the
    replacement itself reads the weight unchecked)."""
    offloaded = is_offloaded(module)
    with align_module_device(module):
        weight = dense_weight(module).detach()
        if weight.device.type == "meta":
            raise ConfigError(f"Weight of {name} is on the meta device and no offload hook can load it.")
        if check and weight.numel() and not torch.isfinite(torch.stack(weight.aminmax())).all():  # NaN propagates
            raise NonFiniteWeightError(f"Weight of {name} contains NaN or Inf; refusing to compress it.")
        return weight.clone() if offloaded else weight  # an offloaded weight goes back to disk on exit


# ----------------------------------------------------------------------------------------------- blocks
def find_blocks(model: nn.Module, names) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks that holds the given module names."""
    names = list(names)
    best = None
    for lname, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            inside = [n for n in names if n.startswith(lname + ".")]
            if inside and (best is None or len(inside) > best[2]):
                best = (lname, module, len(inside))
    if best is None or best[2] != len(names):
        outside = [n for n in names if best is None or not n.startswith(best[0] + ".")]
        raise ConfigError(f"Calibrated methods compress layers inside the model's repeated blocks; {outside[:3]} are not.")
    return best[0], best[1]


def block_index(name: str, prefix: str) -> int:
    """Index, in the block list at ``prefix``, of the block that holds module ``name``."""
    return int(name[len(prefix) + 1 :].split(".")[0])


def units(model: nn.Module, names) -> list[list[str]]:
    """The target ``names`` grouped by the repeated block that holds them (one unit per layer where they are not
    all inside the blocks): the granularity of progress and checkpoints."""
    try:
        prefix, blocks = find_blocks(model, names)
    except ConfigError:
        return [[n] for n in names]
    grouped: list[list[str]] = [[] for _ in blocks]
    for name in names:
        grouped[block_index(name, prefix)].append(name)
    return grouped


# ----------------------------------------------------------------------------------------------- tied head
def tied_output_embedding(model: nn.Module, modules) -> nn.Module | None:
    """The output embedding (``lm_head``) when it is among ``modules`` and shares its weight with the input
    embedding; None otherwise."""
    get_out, get_in = (getattr(model, n, None) for n in ("get_output_embeddings", "get_input_embeddings"))
    head, emb = (get_out() if get_out else None), (get_in() if get_in else None)
    if head is None or emb is None or not any(m is head for m in modules):
        return None
    return head if getattr(head, "weight", None) is getattr(emb, "weight", False) else None


def untie(model: nn.Module, why: str | None = None) -> None:
    """A compressed head is no longer the input embedding (which stays dense, for the lookup): say so in the config,
    or transformers ties the embedding's weight back onto the compressed module at load (``tie_word_embeddings``)
    and fails. Costs the head's compressed bytes beside the embedding's. ``why``: the message logged (a rotated
    head, `hf_compress.transforms.rotation`, is untied for another reason)."""
    config = getattr(model, "config", None)
    for c in (config, config.get_text_config() if hasattr(config, "get_text_config") else None):  # often one object
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    logger.info(why or "the compressed lm_head was tied to the input embeddings: untied (tie_word_embeddings=False); "
                "the embedding stays dense")
