"""The user-facing compression config.

`CompressionConfig` is a transformers `QuantizationConfigMixin` registered under ``quant_method="hf_compress"``,
so it travels the same roads as `BitsAndBytesConfig` or `HqqConfig`: it is stored in ``config.json`` under
``quantization_config``, it selects our `HfQuantizer` on load, and it can be passed to ``from_pretrained`` to
compress while loading (data-free methods only).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from transformers.quantizers import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from .version import __version__
from .errors import ConfigError
from .recipes import RECIPES, expand as expand_recipe, is_recipe

QUANT_METHOD = "hf_compress"
CALIBRATION_DEFAULTS = {"nsamples": 32, "seqlen": 512, "seed": 0, "batch_size": 8, "source": None}
#: calibration options stored only when given, with their default
CALIBRATION_OPTIONAL = {"experts": "routed"}
#: whose statistics a mixture-of-experts expert is fitted on: the tokens routed to it, or every token
EXPERT_CALIBRATION = ("routed", "all")
#: what ``expert_bits`` allocates by: each expert layer's measured output error at each width, or its share of routed
#: tokens under the 4^-b rounding model, or (one width per expert, width 0 = removed) each expert's output-space
#: importance and the output error of its rounded weights (`hf_compress.allocation.allocate_expert_bits`)
EXPERT_BITS_BY = ("error", "usage", "importance")
#: ``avg_bits``: how a layer's error becomes a loss increase (`CompressionConfig`, ``bits_sensitivity``)
BITS_SENSITIVITIES = ("gradient", "measured")


@register_quantization_config(QUANT_METHOD)
class CompressionConfig(QuantizationConfigMixin):
    """What to compress and how.

    Args:
        method: name of a registered compression method (``hf_compress.available_methods()``), e.g. ``"svd"``, or of
            a recipe (`hf_compress.recipes`): ``"best"`` runs the combination that measured best at the bytes of plain
            ``bits``/``group_size``: GPTQ with the activation-aware grid, on a Hadamard-rotated residual stream where
            that costs no bytes (a Llama-layout decoder whose head is not tied to its embeddings). The config then
            holds the concrete method and options, and ``recipe`` the name.
        ratio: fraction of the targeted layers' parameters to remove, in (0, 1). Exclusive with ``rank``.
        rank: one rank for every targeted layer (1 <= rank <= min(out, in)). Exclusive with ``ratio``.
        targets: module-name patterns to compress. A plain name matches the module of that name or any module
            whose name ends with ``"." + name`` (PEFT's ``target_modules`` rule); a pattern with ``*``/``?``/``[``
            is a glob over the full name; ``"re:<regex>"`` is a full-match regular expression. ``None`` means
            every ``nn.Linear`` / GPT-2 ``Conv1D`` inside the model's repeated blocks (never ``lm_head``; name it
            to compress it too: a head tied to the input embeddings is then untied, the embedding stays dense).
        skip: patterns (same rules) of modules to leave untouched, with every layer inside them.
        vision: multimodal models (Gemma 3, LLaVA, Qwen2.5-VL, ...): with the default ``targets``, also compress the
            linear layers outside the language model — the vision tower's blocks and the projector. Default False:
            the language model's blocks only (the log names what was left dense). Data-free methods only: a
            calibrated method compresses one list of blocks, the language model's. Written to config.json only
            when set.
        dense_fallback: keep a layer dense when its low-rank form would not have fewer parameters. Turn off only to
            test factorisations at full rank.
        method_kwargs: extra, method-specific options (JSON-serialisable), e.g. ``{"alpha": 0.5}`` for asvd or
            ``{"compensation": "auto" | "off" | β}`` for svd_llm.
        alloc: rank allocation, ``"uniform"`` or ``"energy"`` (one global budget spent where the measured spectra
            say it buys the most). ``None``: the method's best default.
        calibration: for calibrated methods, ``{"nsamples": 32, "seqlen": 512, "seed": 0, "batch_size": 8,
            "experts": "routed", "source": <name>}``; the text itself is passed to `compress` (``calibration=``).
            ``experts`` (mixture-of-experts models): ``"routed"`` fits each expert on the tokens the router sends to
            it, ``"all"`` on every token (the block's output still uses the routed ones); an expert that received
            no token is fitted on white inputs, as its method does without data. ``source`` is informational.
        bits: weight quantization bits (2, 3, 4 or 8). With a quantization method (``rtn``, ``hqq``, ``gptq``) every
            targeted layer becomes a `QuantLinear`; with a low-rank method the *factors* are quantized
            (`QuantLowRankLinear`), by ``quantizer``.
        group_size: quantization group size along the input dimension (default 128); when it does not divide the
            input dimension, the last group of each row is partial (nothing is padded).
        eora_rank: rank of the EoRA low-rank compensation of the quantization error (quantization methods only);
            it uses the calibration inputs' Gram when calibration data is given, plain SVD of the error otherwise.
        eora_bits: instead of ``eora_rank``, a budget: the EoRA factors may add this many bits per weight on average
            over the quantized layers (stored in the model's dtype); each layer's rank is chosen by one global greedy
            allocation on the singular values of the (input-weighted) errors, so ranks differ per layer and may be 0.
            Experimental: on SmolLM2-135M it does worse than one uniform ``eora_rank`` of the same bits (docs/quantization.md).
        eora_factor_bits: store the EoRA factors themselves as packed ``eora_factor_bits``-bit codes (2, 3, 4 or 8;
            groups of ``eora_factor_group_size`` along each factor's long side, default 128) instead of in the
            model's dtype: rank r then costs about r·(out+in)·(bits + 32/group) bits instead of r·(out+in)·16. The
            factors are then frozen (a LoRA adapter on top still trains and merges).
        quantizer: quantization method for the factors of a low-rank method with ``bits`` (default: ``gptq`` when
            the low-rank method is calibrated, ``hqq`` otherwise).
        expert_bits: mixture-of-experts models, quantization methods: the bit widths an expert's layers may get
            (e.g. ``[2, 3, 4]``) instead of ``bits`` for all; ``bits`` is then the budget, the average bits per
            expert weight. Each expert's width comes from one global allocation over the experts of every block by
            routing statistics on the calibration data (`hf_compress.allocation.allocate_expert_bits`: experts the
            router uses more get more bits). Needs calibration data; other layers keep ``bits``. A width 0 (e.g.
            ``[0, 3, 4]``) removes experts as ``expert_prune`` does (router rows included, every block the same
            number, at least ``num_experts_per_tok`` kept): the budget ``bits`` is then per *original* expert weight,
            so removed experts pay for wider ones, and the allocation is by ``expert_bits_by="importance"`` (the
            default with 0).
        avg_bits: quantization methods, instead of ``bits``: a budget of this many bits per weight *as stored* (codes,
            scales and zeros) on average over the targeted layers, with a bit width per layer from ``bit_choices``
            chosen by one global allocation (`hf_compress.allocation.allocate_layer_formats`): each layer's loss
            increase at each width is estimated from a pre-pass over the dense model on the calibration data (the
            activation-weighted error of rounding it, tr((W − Q_b(W)) E[xxᵀ] (W − Q_b(W))ᵀ), rescaled so that in up to four
            reference formats it is the error the run's method itself leaves — for gptq, after error compensation —
            times the mean squared loss gradient at its output), and the widths go where they reduce it most per
            stored bit. Layers that
            read the same input (q/k/v; gate/up: the layers vLLM fuses) share one width. Needs calibration data.
            The chosen widths are recorded per layer in ``modules``; at g64 with float16 scales, scales and zeros
            add 0.5 bits per weight to the codes' bits.
        bit_choices: with ``avg_bits``, the widths a layer may get (default all of 2, 3, 4, 8).
        group_choices: with ``avg_bits``, the group sizes a layer may get (default ``[group_size]``): the allocation
            is then over formats (width, group size), e.g. ``[64, 192, 576]`` lets a layer trade scale bytes for code
            bits (3-bit g192 stores 3.17 bits per weight, g64 3.5). A layer only gets group sizes that divide its
            input width (unless none does); layers that share a width share the group size too.
        bits_sensitivity: with ``avg_bits``, how a layer's error is turned into a loss increase: ``"gradient"``
            (default; the mean squared loss gradient at its output) or ``"measured"`` (each unit of layers that
            share a format — q/k/v, o, gate/up, down — is quantized alone in its cheapest format and the KL of the
            model's next-token distributions on two calibration windows is measured: one forward of the model per
            unit, no gradient pass).
        expert_bits_by: what the allocation weighs: ``"usage"`` (default), each expert's share of routed tokens
            times 4^-b; ``"error"``, each expert layer's measured output error at each width on the tokens routed to
            it, weighted by the routing weights (`hf_compress.statistics.expert_errors`). On the top-4 MoE SmolLM2
            neither beats uniform widths at the same bytes (docs/moe.md). ``"importance"`` (default when
            ``expert_bits`` holds 0): one width per expert (its layers share it), chosen before anything is compressed
            on the dense model: removing expert e costs its importance Σ_t w_t,e·‖f_e(x_t)‖ over its routed
            calibration tokens (as ``expert_prune`` ranks experts), width b costs Σ_t w_t,e·‖f_e^b(x_t) − f_e(x_t)‖
            with all of e's layers rounded to b bits (RTN), i.e. importance × the expert's relative output error at
            b (`hf_compress.transforms.expert_pruning.expert_costs`).
        expert_prune: mixture-of-experts models: the fraction of each block's experts to remove before compressing,
            the least important by routing weight x output norm on the calibration tokens
            (`hf_compress.transforms.expert_pruning`); the model keeps its class with fewer experts (its config's
            expert count is updated), so the checkpoint loads with ``from_pretrained``. Needs calibration data.
        scale_dtype: storage dtype of scales and zeros, ``"float16"`` (default) or ``"bfloat16"``.
        rotate: incoherence processing before any weight method (`hf_compress.transforms.rotation`; Llama-architecture
            decoders: llama, qwen2, mistral): every RMSNorm weight is folded into the layers that read it and the
            residual stream is rotated by an orthogonal matrix folded into the embedding, every layer that reads or
            writes the stream and the head — ``"hadamard"`` (a randomized Hadamard; a random orthogonal matrix where
            the hidden size has no Hadamard construction) or ``"orthogonal"`` (random orthogonal). The model stays a
            plain model of its class computing the same function, so it exports to every format; a tied head is
            untied (the checkpoint then holds both matrices). ``None`` (default): no rotation.
        rotate_seed: seed of the rotation's random signs / matrix (default 0).
        rotate_heads: with ``rotate``, also rotate every attention head's values by one orthogonal matrix of the head
            size (the same kind), folded into v_proj's rows and o_proj's columns (SpinQuant's R2): o_proj's input
            groups become incoherent too. Exact and folded, like ``rotate``.
        channel_scales: ``"awq"``: activation-aware channel scales (`hf_compress.transforms.channel_scales`; rtn, hqq,
            gptq; needs calibration data): block by block, before the block is quantized, the input channels of each
            group of layers fed by a norm (q/k/v; gate/up), by v_proj (o_proj) or by up_proj (down_proj) are scaled by
            s = a^α / w^(1−α) (AWQ: a the channels' mean |x|, w the weights' mean relative magnitude), α searched to
            minimise the layers' rounding error on their inputs; 1/s is folded into the norm's weight or the producing
            layer's rows. Exact and folded, no bytes added: the model stays a plain model of its class. Stored only
            when set. ``None`` (default): off.
        learn_rounding: learned rounding and clipping (`hf_compress.pipelines.reconstruct`; rtn and gptq): after a
            block's layers are quantized, per-weight rounding offsets in [-0.5, 0.5] and per-group clipping factors
            of the grid's range in [min_clip, 1] are learned by signed gradient descent so that the quantized block's
            output matches the dense model's on the calibration windows (AutoRound). ``True`` or a dict of options:
            ``{"iters": 200, "lr": 1/iters, "batch_size": 4 (windows per step), "min_clip": 0.5, "seed": 0}``.
            Needs calibration data; the result is stored as rtn/gptq store theirs (codes, scales, zeros). Stored
            complete (defaults filled in), and only when set. ``None`` (default): off.
        modules: filled in by hf-compress: the compressed modules of a model, ``{name: {"type": ..., ...}}``.
            It is refreshed from the live modules each time the model is saved.
        kv: KV-cache compression that loads with the model (`hf_compress.kv`): a spec dict such as
            ``{"method": "quant", "bits": 4}`` or a CLI string (``quant4``, ``quant2``, ``gear``, ``lowrank:0.5``,
            ``xkv``, ``snapkv:0.25``); stored complete (defaults and calibrated ranks filled in). A config may hold
            only ``kv`` (no ratio/rank): the weights then stay as they are.
        recipe: set by hf-compress: the recipe (``method="best"``) the concrete method and options came from.
        provenance: where the compressed model came from, for its model card: ``{"base_model": <Hub id>,
            "license": ..., "language": [...]}``. Filled in by `compress` from what the model was loaded from when
            known (a Hub id, the base model card, GGUF metadata); pass it to override.
    """

    def __init__(
        self,
        method: str = "svd",
        ratio: float | None = None,
        rank: int | None = None,
        targets: list[str] | str | None = None,
        skip: list[str] | str | None = None,
        vision: bool = False,
        dense_fallback: bool = True,
        method_kwargs: dict[str, Any] | None = None,
        alloc: str | None = None,
        calibration: dict[str, Any] | None = None,
        bits: int | None = None,
        group_size: int = 128,
        eora_rank: int | None = None,
        eora_bits: float | None = None,
        eora_factor_bits: int | None = None,
        eora_factor_group_size: int = 128,
        quantizer: str | None = None,
        scale_dtype: str = "float16",
        expert_bits: list[int] | None = None,
        avg_bits: float | None = None,
        bit_choices: list[int] | None = None,
        group_choices: list[int] | None = None,
        bits_sensitivity: str = "gradient",
        expert_bits_by: str | None = None,
        expert_prune: float | None = None,
        pruned_experts: dict[str, Any] | None = None,
        rotate: str | None = None,
        rotate_seed: int = 0,
        rotate_heads: bool = False,
        channel_scales: str | None = None,
        learn_rounding: dict[str, Any] | bool | None = None,
        modules: dict[str, dict[str, Any]] | None = None,
        kv: dict[str, Any] | str | None = None,
        hf_compress_version: str | None = None,
        provenance: dict[str, Any] | None = None,
        recipe: str | None = None,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ):
        if unknown:
            raise ConfigError(
                f"Unknown hf-compress config field(s) {sorted(unknown)}; this checkpoint may need a newer "
                f"hf-compress than {__version__} (pip install -U hf-compress)."
            )
        if quant_method != QUANT_METHOD:
            raise ConfigError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.recipe, self.recipe_filled = recipe, ()
        if is_recipe(method):
            name, fields = method, {"bits": bits, "ratio": ratio, "rank": rank, "rotate": rotate}
            method, fields, method_kwargs, self.recipe_filled = expand_recipe(name, fields, dict(method_kwargs or {}))
            self.recipe = name
            rotate = fields["rotate"]
        elif recipe is not None and not is_recipe(recipe):
            raise ConfigError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        self.method = method
        self.ratio = ratio
        self.rank = rank
        self.targets = [targets] if isinstance(targets, str) else (list(targets) if targets is not None else None)
        self.skip = [skip] if isinstance(skip, str) else list(skip or [])
        self.vision = vision
        self.dense_fallback = bool(dense_fallback)
        self.method_kwargs = dict(method_kwargs or {})
        self.alloc = alloc
        self.calibration = {**CALIBRATION_DEFAULTS, **(calibration or {})}
        self.bits = bits
        self.group_size = group_size
        self.eora_rank = eora_rank
        self.eora_bits = eora_bits
        self.eora_factor_bits = eora_factor_bits
        self.eora_factor_group_size = eora_factor_group_size
        self.quantizer = quantizer
        self.scale_dtype = scale_dtype
        self.expert_bits = sorted(set(expert_bits)) if expert_bits else None
        self.avg_bits = avg_bits
        self.bit_choices = bit_choices
        self.group_choices = group_choices
        self.bits_sensitivity = bits_sensitivity
        self.expert_bits_by = expert_bits_by
        self.expert_prune = expert_prune
        #: what ``expert_prune`` (or ``expert_bits`` with 0) removed (set by `compress`): {"experts": [E, E'],
        #: "parameters": n, "dropped": {block: [...]}}; with ``expert_bits_by="importance"`` also "widths": {width:
        #: number of experts} (0: removed)
        self.pruned_experts = pruned_experts
        self.rotate = rotate
        self.rotate_seed = rotate_seed
        self.rotate_heads = rotate_heads
        self.channel_scales = channel_scales
        self.learn_rounding = copy.deepcopy(learn_rounding)
        self.modules = dict(modules or {})
        self.kv = kv
        self.hf_compress_version = hf_compress_version or __version__
        self.provenance = dict(provenance or {})
        self.post_init()

    def post_init(self):
        from .kv.registry import parse_kv_spec
        from .methods import get_method

        self.kv = parse_kv_spec(self.kv)  # ConfigError naming unknown KV methods / options

        from .allocation import ALLOCATORS

        method = get_method(self.method)
        method(**self.method_kwargs)  # raises a clear error for unknown methods / options
        self._check_quantization(method)
        if self.alloc is not None and self.alloc not in ALLOCATORS:
            raise ConfigError(f"alloc must be one of {ALLOCATORS}, got {self.alloc!r}")
        if self.alloc == "energy" and self.rank is not None:
            raise ConfigError("alloc='energy' distributes a ratio; give ratio, not rank")
        unknown = set(self.calibration) - set(CALIBRATION_DEFAULTS) - set(CALIBRATION_OPTIONAL)
        if unknown:
            raise ConfigError(f"Unknown calibration option(s) {sorted(unknown)}; known: "
                              f"{sorted(CALIBRATION_DEFAULTS) + sorted(CALIBRATION_OPTIONAL)}")
        for key in ("nsamples", "seqlen"):
            if not isinstance(self.calibration[key], int) or self.calibration[key] < (2 if key == "seqlen" else 1):
                raise ConfigError(f"calibration {key} must be a positive integer, got {self.calibration[key]!r}")
        if self.calibration.get("experts", "routed") not in EXPERT_CALIBRATION:
            raise ConfigError(f"calibration experts must be one of {EXPERT_CALIBRATION}, got "
                              f"{self.calibration['experts']!r}")
        if self.ratio is not None and self.rank is not None:
            raise ConfigError("Give either ratio or rank, not both.")
        if method.family == "quant":
            if self.ratio is not None or self.rank is not None:
                raise ConfigError(f"{self.method!r} quantizes; ratio/rank belong to low-rank methods "
                                  "(for a low-rank compensation of the quantization error use eora_rank)")
        elif self.ratio is None and self.rank is None and not self.modules and not self.kv:
            raise ConfigError("Give a target ratio (fraction of parameters removed, in (0, 1)) or a rank.")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise ConfigError(f"ratio must be a number in (0, 1), got {self.ratio!r}")
            if not 0.0 < float(self.ratio) < 1.0:
                raise ConfigError(f"ratio must lie strictly between 0 and 1 (fraction of parameters removed), got {self.ratio}")
            self.ratio = float(self.ratio)
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int):
                raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
            if self.rank <= 0:
                raise ConfigError(f"rank must be a positive integer, got {self.rank}")
        if not isinstance(self.vision, bool):
            raise ConfigError(f"vision must be True or False, got {self.vision!r}")
        self._check_rotation(method)
        self._check_channel_scales(method)
        from .pipelines.reconstruct import options as learn_rounding_options

        self.learn_rounding = learn_rounding_options(self.learn_rounding, self.method, self)
        for field in ("targets", "skip"):
            patterns = getattr(self, field) or []
            if not all(isinstance(p, str) and p for p in patterns):
                raise ConfigError(f"{field} must be a list of non-empty strings, got {patterns!r}")
        try:
            json.dumps(self.method_kwargs)
        except TypeError as e:
            raise ConfigError(f"method_kwargs must be JSON-serialisable: {e}") from None

    def _check_rotation(self, method) -> None:
        from .transforms import ROTATIONS

        if isinstance(self.rotate_seed, bool) or not isinstance(self.rotate_seed, int) or self.rotate_seed < 0:
            raise ConfigError(f"rotate_seed must be a non-negative integer, got {self.rotate_seed!r}")
        if not isinstance(self.rotate_heads, bool):
            raise ConfigError(f"rotate_heads must be true or false, got {self.rotate_heads!r}")
        if self.rotate is None:
            if self.rotate_heads:
                raise ConfigError("rotate_heads rotates the attention heads along with the residual stream: give it "
                                  "with rotate")
            return
        if not isinstance(self.rotate, str):
            raise ConfigError(f"rotate must be one of {ROTATIONS.names()} or null, got {self.rotate!r}")
        ROTATIONS.get(self.rotate)  # names the known rotations
        if method.family != "quant" and self.ratio is None and self.rank is None and not self.modules:
            raise ConfigError("rotate transforms the weights before a weight method: give bits (rtn, hqq, gptq) or a "
                              "ratio/rank")

    def _check_channel_scales(self, method) -> None:
        from .transforms.channel_scales import CHANNEL_SCALES

        if self.channel_scales is None:
            return
        if self.channel_scales not in CHANNEL_SCALES:
            raise ConfigError(f"channel_scales must be one of {list(CHANNEL_SCALES)} or null, got {self.channel_scales!r}")
        if method.family != "quant":
            raise ConfigError(f"channel_scales={self.channel_scales!r} scales the input channels a quantization grid "
                              f"rounds: use it with rtn, hqq or gptq, not {self.method!r}")

    def _check_quantization(self, method) -> None:
        from .kernels import SUPPORTED_BITS
        from .methods import get_method

        self._check_avg_bits(method)
        if method.family == "quant" and self.bits is None and self.avg_bits is None:
            raise ConfigError(f"method {self.method!r} quantizes: give bits (one of {SUPPORTED_BITS}) or avg_bits "
                              "(an average over per-layer widths)")
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS):
            raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.eora_rank is not None:
            if method.family != "quant":
                raise ConfigError("eora_rank compensates a quantization error: use it with rtn, hqq or gptq")
            if isinstance(self.eora_rank, bool) or not isinstance(self.eora_rank, int) or self.eora_rank < 0:
                raise ConfigError(f"eora_rank must be a non-negative integer, got {self.eora_rank!r}")
        if self.eora_bits is not None:
            if method.family != "quant":
                raise ConfigError("eora_bits budgets the compensation of a quantization error: use it with rtn, hqq "
                                  "or gptq")
            if self.eora_rank is not None:
                raise ConfigError("Give either eora_rank (one rank for every layer) or eora_bits (a budget), not both.")
            if isinstance(self.eora_bits, bool) or not isinstance(self.eora_bits, (int, float)) or not (
                    0 < self.eora_bits <= 64):
                raise ConfigError(f"eora_bits must be a positive number of extra bits per weight, got {self.eora_bits!r}")
            self.eora_bits = float(self.eora_bits)
        if self.eora_factor_bits is not None:
            if not (self.eora_rank or self.eora_bits):
                raise ConfigError("eora_factor_bits quantizes the EoRA factors: give it with eora_rank or eora_bits")
            if isinstance(self.eora_factor_bits, bool) or self.eora_factor_bits not in SUPPORTED_BITS:
                raise ConfigError(f"eora_factor_bits must be one of {SUPPORTED_BITS}, got {self.eora_factor_bits!r}")
        if (isinstance(self.eora_factor_group_size, bool) or not isinstance(self.eora_factor_group_size, int)
                or self.eora_factor_group_size < 1):
            raise ConfigError(f"eora_factor_group_size must be a positive integer, got {self.eora_factor_group_size!r}")
        if self.quantizer is not None:
            if method.family == "quant" or self.bits is None:
                raise ConfigError("quantizer picks how a low-rank method's factors are quantized: give it with a "
                                  "low-rank method and bits")
            if get_method(self.quantizer).family != "quant":
                raise ConfigError(f"quantizer must be a quantization method (rtn, hqq, gptq), got {self.quantizer!r}")
        if self.expert_bits_by is None:  # the default: "importance" when experts may be removed
            self.expert_bits_by = "importance" if self.expert_bits and 0 in self.expert_bits else "usage"
        if self.expert_bits is not None:
            if method.family != "quant":
                raise ConfigError("expert_bits allocates quantization bit widths: use it with rtn, hqq or gptq")
            if any(isinstance(b, bool) or b not in (0, *SUPPORTED_BITS) for b in self.expert_bits):
                raise ConfigError(f"expert_bits must be bit widths among {SUPPORTED_BITS}, or 0 (the expert is "
                                  f"removed), got {self.expert_bits!r}")
            if not any(self.expert_bits):
                raise ConfigError(f"expert_bits needs at least one width above 0, got {self.expert_bits!r}")
            if self.expert_bits_by not in EXPERT_BITS_BY:
                raise ConfigError(f"expert_bits_by must be one of {EXPERT_BITS_BY}, got {self.expert_bits_by!r}")
            if 0 in self.expert_bits and self.expert_bits_by != "importance":
                raise ConfigError(f"expert_bits with 0 removes experts: the cost of removing one is its importance, "
                                  f"so it needs expert_bits_by='importance' (the default with 0), not "
                                  f"{self.expert_bits_by!r}")
            if self.expert_bits_by == "importance" and self.expert_prune:
                raise ConfigError("expert_bits_by='importance' chooses which experts to remove itself (give 0 among "
                                  "expert_bits): drop expert_prune")
            if not self.expert_bits[0] <= self.bits <= self.expert_bits[-1]:
                raise ConfigError(f"bits ({self.bits}) is the experts' average budget: it must lie within "
                                  f"expert_bits {self.expert_bits}")
        if self.expert_prune is not None and (isinstance(self.expert_prune, bool)
                                              or not isinstance(self.expert_prune, (int, float))
                                              or not 0.0 < self.expert_prune < 1.0):
            raise ConfigError(f"expert_prune is the fraction of each block's experts to remove: it must lie strictly "
                              f"between 0 and 1, got {self.expert_prune!r}")
        if self.scale_dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"scale_dtype must be 'float16' or 'bfloat16', got {self.scale_dtype!r}")

    def _check_avg_bits(self, method) -> None:
        from .kernels import SUPPORTED_BITS

        if self.avg_bits is None:
            if self.bit_choices is not None:
                raise ConfigError("bit_choices are the widths a layer may get under avg_bits: give it with avg_bits")
            if self.group_choices is not None:
                raise ConfigError("group_choices are the group sizes a layer may get under avg_bits: give it with "
                                  "avg_bits")
            if self.bits_sensitivity != "gradient":
                raise ConfigError("bits_sensitivity weighs the layers' errors under avg_bits: give it with avg_bits")
            return
        if self.bits_sensitivity not in BITS_SENSITIVITIES:
            raise ConfigError(f"bits_sensitivity must be one of {list(BITS_SENSITIVITIES)}, got "
                              f"{self.bits_sensitivity!r}")
        if method.family != "quant":
            raise ConfigError("avg_bits allocates per-layer quantization widths: use it with rtn, hqq or gptq")
        if self.bits is not None:
            raise ConfigError("Give either bits (one width for every layer) or avg_bits (a budget of stored bits per "
                              "weight, widths per layer), not both.")
        if self.expert_bits is not None:
            raise ConfigError("avg_bits already gives every layer, experts included, its own width: drop expert_bits")
        if isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)) or not (
                0 < self.avg_bits <= 64):
            raise ConfigError(f"avg_bits must be a positive number of stored bits per weight, got {self.avg_bits!r}")
        self.avg_bits = float(self.avg_bits)
        choices = list(SUPPORTED_BITS) if self.bit_choices is None else self.bit_choices
        if (isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__")
                or not choices or any(isinstance(b, bool) or b not in SUPPORTED_BITS for b in choices)):
            raise ConfigError(f"bit_choices must be a non-empty list of widths among {SUPPORTED_BITS}, got "
                              f"{self.bit_choices!r}")
        self.bit_choices = sorted(set(choices))
        groups = [self.group_size] if self.group_choices is None else self.group_choices
        if (isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__") or not groups
                or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in groups)):
            raise ConfigError(f"group_choices must be a non-empty list of positive group sizes, got "
                              f"{self.group_choices!r}")
        self.group_choices = sorted(set(groups))

    @property
    def family(self) -> str:
        from .methods import get_method

        return get_method(self.method).family

    # QuantizationConfigMixin.to_dict is a deepcopy of __dict__; keep it explicit and stable.
    def to_dict(self) -> dict[str, Any]:
        extra = {"vision": True} if self.vision else {}  # absent when off: older hf-compress reads the checkpoint
        return {**extra,
            "quant_method": self.quant_method,
            "method": self.method,
            "ratio": self.ratio,
            "rank": self.rank,
            "targets": copy.deepcopy(self.targets),
            "skip": list(self.skip),
            "dense_fallback": self.dense_fallback,
            "method_kwargs": copy.deepcopy(self.method_kwargs),
            "alloc": self.alloc,
            "calibration": copy.deepcopy(self.calibration),
            "bits": self.bits,
            "group_size": self.group_size,
            "eora_rank": self.eora_rank,
            "eora_bits": self.eora_bits,
            "eora_factor_bits": self.eora_factor_bits,
            "eora_factor_group_size": self.eora_factor_group_size,
            "quantizer": self.quantizer,
            "scale_dtype": self.scale_dtype,
            **({"expert_bits": list(self.expert_bits), "expert_bits_by": self.expert_bits_by}
               if self.expert_bits else {}),  # stored when used
            **({"expert_prune": self.expert_prune} if self.expert_prune else {}),
            **({"pruned_experts": copy.deepcopy(self.pruned_experts)} if self.pruned_experts else {}),
            **({"avg_bits": self.avg_bits, "bit_choices": list(self.bit_choices)} if self.avg_bits else {}),
            **({"group_choices": list(self.group_choices)}
               if self.avg_bits and self.group_choices != [self.group_size] else {}),
            **({"bits_sensitivity": self.bits_sensitivity}
               if self.avg_bits and self.bits_sensitivity != "gradient" else {}),
            **({"rotate": self.rotate, "rotate_seed": self.rotate_seed} if self.rotate else {}),  # stored when used
            **({"rotate_heads": True} if self.rotate_heads else {}),
            **({"channel_scales": self.channel_scales} if self.channel_scales else {}),  # stored when used
            **({"learn_rounding": copy.deepcopy(self.learn_rounding)} if self.learn_rounding else {}),
            "modules": copy.deepcopy(self.modules),
            "kv": copy.deepcopy(self.kv),
            "hf_compress_version": self.hf_compress_version,
            "provenance": copy.deepcopy(self.provenance),
            **({"recipe": self.recipe} if self.recipe else {}),  # stored when used
        }

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        config = cls(**{**config_dict, **kwargs})
        return (config, {}) if return_unused_kwargs else config

    @classmethod
    def coerce(cls, config: "CompressionConfig | dict | str") -> "CompressionConfig":
        """Accept a config object, a dict, a JSON string or a path to a JSON file."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if isinstance(config, str):
            text = config
            if not text.lstrip().startswith("{"):
                with open(config, encoding="utf-8") as f:
                    text = f.read()
            return cls.from_dict(json.loads(text))
        raise ConfigError(f"Expected a CompressionConfig, dict or JSON, got {type(config).__name__}")

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self):
        return f"{self.__class__.__name__} {self.to_json_string()}"

    def __eq__(self, other):
        return isinstance(other, CompressionConfig) and self.to_dict() == other.to_dict()
