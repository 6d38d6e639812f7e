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

from . import __version__
from .errors import ConfigError

QUANT_METHOD = "hf_compress"
CALIBRATION_DEFAULTS = {"nsamples": 32, "seqlen": 512, "seed": 0, "batch_size": 8, "source": None}


@register_quantization_config(QUANT_METHOD)
class CompressionConfig(QuantizationConfigMixin):
    """What to compress and how.

    Args:
        method: name of a registered compression method (``hf_compress.available_methods()``), e.g. ``"svd"``.
        ratio: fraction of the targeted layers' parameters to remove, in (0, 1). Exclusive with ``rank``.
        rank: one rank for every targeted layer (1 <= rank <= min(out, in)). Exclusive with ``ratio``.
        targets: module-name patterns to compress. A plain name matches the module of that name or any module
            whose name ends with ``"." + name`` (PEFT's ``target_modules`` rule); a pattern with ``*``/``?``/``[``
            is a glob over the full name; ``"re:<regex>"`` is a full-match regular expression. ``None`` means
            every ``nn.Linear`` / GPT-2 ``Conv1D`` inside the model's repeated blocks (never ``lm_head``).
        skip: patterns (same rules) of modules to leave untouched.
        dense_fallback: keep a layer dense when its low-rank form would not have fewer parameters. Turn off only to
            test factorisations at full rank.
        method_kwargs: extra, method-specific options (JSON-serialisable), e.g. ``{"alpha": 0.5}`` for asvd or
            ``{"compensation": "auto" | "off" | β}`` for svd_llm.
        alloc: rank allocation, ``"uniform"`` or ``"energy"`` (one global budget spent where the measured spectra
            say it buys the most). ``None``: the method's best default.
        calibration: for calibrated methods, ``{"nsamples": 32, "seqlen": 512, "seed": 0, "source": <name>}``;
            the text itself is passed to `compress` (``calibration=``). ``source`` is informational.
        modules: filled in by hf-compress: the compressed modules of a model, ``{name: {"type": ..., ...}}``.
            It is refreshed from the live modules each time the model is saved.
    """

    def __init__(
        self,
        method: str = "svd",
        ratio: float | None = None,
        rank: int | None = None,
        targets: list[str] | str | None = None,
        skip: list[str] | str | None = None,
        dense_fallback: bool = True,
        method_kwargs: dict[str, Any] | None = None,
        alloc: str | None = None,
        calibration: dict[str, Any] | None = None,
        modules: dict[str, dict[str, Any]] | None = None,
        hf_compress_version: str | None = None,
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
        self.method = method
        self.ratio = ratio
        self.rank = rank
        self.targets = [targets] if isinstance(targets, str) else (list(targets) if targets is not None else None)
        self.skip = [skip] if isinstance(skip, str) else list(skip or [])
        self.dense_fallback = bool(dense_fallback)
        self.method_kwargs = dict(method_kwargs or {})
        self.alloc = alloc
        self.calibration = {**CALIBRATION_DEFAULTS, **(calibration or {})}
        self.modules = dict(modules or {})
        self.hf_compress_version = hf_compress_version or __version__
        self.post_init()

    def post_init(self):
        from .methods import get_method

        from .allocation import ALLOCATORS

        get_method(self.method)(**self.method_kwargs)  # raises a clear error for unknown methods / options
        if self.alloc is not None and self.alloc not in ALLOCATORS:
            raise ConfigError(f"alloc must be one of {ALLOCATORS}, got {self.alloc!r}")
        if self.alloc == "energy" and self.rank is not None:
            raise ConfigError("alloc='energy' distributes a ratio; give ratio, not rank")
        unknown = set(self.calibration) - set(CALIBRATION_DEFAULTS)
        if unknown:
            raise ConfigError(f"Unknown calibration option(s) {sorted(unknown)}; known: {sorted(CALIBRATION_DEFAULTS)}")
        for key in ("nsamples", "seqlen"):
            if not isinstance(self.calibration[key], int) or self.calibration[key] < (2 if key == "seqlen" else 1):
                raise ConfigError(f"calibration {key} must be a positive integer, got {self.calibration[key]!r}")
        if self.ratio is not None and self.rank is not None:
            raise ConfigError("Give either ratio or rank, not both.")
        if self.ratio is None and self.rank is None and not self.modules:
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
        for field in ("targets", "skip"):
            patterns = getattr(self, field) or []
            if not all(isinstance(p, str) and p for p in patterns):
                raise ConfigError(f"{field} must be a list of non-empty strings, got {patterns!r}")
        try:
            json.dumps(self.method_kwargs)
        except TypeError as e:
            raise ConfigError(f"method_kwargs must be JSON-serialisable: {e}") from None

    # QuantizationConfigMixin.to_dict is a deepcopy of __dict__; keep it explicit and stable.
    def to_dict(self) -> dict[str, Any]:
        return {
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
            "modules": copy.deepcopy(self.modules),
            "hf_compress_version": self.hf_compress_version,
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
