"""One registry for KV-cache methods, and the ``kv`` spec: a dict stored in `CompressionConfig.kv` (and so in the
checkpoint's ``quantization_config``), parsed from CLI strings such as ``quant4`` or ``snapkv:0.25``."""

from __future__ import annotations

import copy
import json
from typing import Any

from ..errors import ConfigError
from ..registry import Registry

KV_METHODS = Registry("KV-cache method")


class KVMethod:
    """What every registered KV method provides (one subclass per method file)."""

    defaults: dict = {}  # every option with its default
    recorded: tuple = ()  # options filled by calibration and stored in the checkpoint's spec
    stores_tensors = False  # calibrated tensors saved in model.safetensors (``projections_for`` shapes them)

    @classmethod
    def validate(cls, spec) -> None:
        """Raise ConfigError for a bad option of a complete spec."""

    @classmethod
    def make_cache(cls, model, spec):
        raise NotImplementedError

    @classmethod
    def check_model(cls, model, spec) -> None:
        """Raise ConfigError where the spec cannot serve this model (heads, head_dim, layers)."""

    @classmethod
    def needs_calibration(cls, spec) -> bool:
        return False

    @classmethod
    def calibrate(cls, model, spec, windows):
        """Fill the spec's ``recorded`` options from calibration token windows [n, seqlen]; returns the spec."""
        return spec


# CLI shorthands -> spec dicts. "name:x" sets the method's `keep` (fraction of the cache kept: tokens for eviction,
# dimensions for low-rank / xKV), or for quantized caches `avg_bits` (per-layer widths from that budget, calibrated).
SHORTHANDS = {
    "quant8": {"method": "quant", "bits": 8},
    "quant4": {"method": "quant", "bits": 4},
    "quant2": {"method": "quant", "bits": 2},
    "kivi4": {"method": "quant", "bits": 4},
    "kivi2": {"method": "quant", "bits": 2},
    "gear": {"method": "gear"},
    "gear4": {"method": "gear", "bits": 4},
    "gear2": {"method": "gear", "bits": 2},
    # keys 4-bit in 128-token groups, values 3-bit leaving a 16-token window one by one: with ":AVG", e.g. quantmix:3.2
    "quantmix": {"method": "quant", "bits": 4, "value_bits": 3, "residual": 16, "group_size": 128, "value_flush": 1},
    "lowrank": {"method": "lowrank"},
    "xkv": {"method": "xkv"},
    "snapkv": {"method": "snapkv"},
    "pyramidkv": {"method": "snapkv", "schedule": "pyramid"},
}


def available_kv_methods() -> list[str]:
    _load()
    return KV_METHODS.names()


def _load() -> None:
    from . import eviction, lowrank, quant, xkv  # noqa: F401  (register the methods)


def parse_kv_spec(spec: Any) -> dict[str, Any] | None:
    """A CLI string (``quant4``, ``gear``, ``lowrank:0.5``, ``xkv``, ``snapkv:0.25``, a JSON object) or a dict ->
    a validated, complete spec dict (defaults filled in). ``None``/``""``/``"none"`` -> None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("", "none", "off"):
            return None
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--kv JSON is not valid: {e}") from None
        else:
            name, _, arg = text.partition(":")
            if name not in SHORTHANDS:
                raise ConfigError(f"Unknown KV-cache spec {text!r}; use one of {sorted(SHORTHANDS)} "
                                  "(optionally name:fraction, e.g. snapkv:0.25) or a JSON object")
            spec = dict(SHORTHANDS[name])
            if arg:
                try:
                    value = float(arg)
                except ValueError:
                    raise ConfigError(f"KV spec {text!r}: {arg!r} after ':' is not a number") from None
                spec["avg_bits" if spec["method"] in ("quant", "gear") else "keep"] = value
    if not isinstance(spec, dict):
        raise ConfigError(f"kv must be a dict, a JSON string or a CLI spec, got {type(spec).__name__}")
    return validate_kv(spec)


def validate_kv(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check every option of a spec dict; unknown methods / options raise ConfigError."""
    _load()
    spec = copy.deepcopy(spec)
    if "method" not in spec:
        raise ConfigError(f"kv spec needs a 'method' (one of {KV_METHODS.names()}), got {spec!r}")
    method = KV_METHODS.get(spec["method"])
    unknown = set(spec) - {"method"} - set(method.defaults) - set(method.recorded)
    if unknown:
        raise ConfigError(f"Unknown option(s) {sorted(unknown)} for KV method {spec['method']!r}; known: "
                          f"{sorted(method.defaults)}")
    full = {"method": spec["method"], **copy.deepcopy(method.defaults), **spec}
    method.validate(full)
    try:
        json.dumps(full)
    except TypeError as e:
        raise ConfigError(f"kv spec must be JSON-serialisable: {e}") from None
    return full


def kv_method(spec: dict[str, Any]):
    _load()
    return KV_METHODS.get(spec["method"])


def check_fraction(spec: dict, key: str = "keep") -> None:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ConfigError(f"KV {spec['method']} {key} must be a fraction in (0, 1], got {v!r}")


def check_int(spec: dict, key: str, lo: int, hi: int | None = None, pow2: bool = False) -> None:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"KV {spec['method']} {key} must be an integer {rng}, got {v!r}")
    if pow2 and v & (v - 1):
        raise ConfigError(f"KV {spec['method']} {key} must be a power of two, got {v}")
