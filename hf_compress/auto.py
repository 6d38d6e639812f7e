"""Auto-class registration: how an hf-compress checkpoint is recognised, and how it is written.

On disk, ``config.json`` of a compressed checkpoint reads::

    {"model_type": "hf_compress", "auto_map": {...shim...}, "hf_compress_version": ...,
     "architectures": ["LlamaForCausalLM"], "base_config": {<the native config, quantization_config inside>}}

* plain transformers does not know ``model_type: hf_compress`` and ``auto_map`` asks for remote code, so
  without the plugin loading stops with an error instead of producing random weights (fail closed);
* with ``import hf_compress``, `CompressedConfig` (registered with `AutoConfig`) unwraps the native config,
  and the factories registered with `AutoModel*` hand over to the *native* class (`LlamaForCausalLM`, ...),
  whose ``from_pretrained`` then meets our quantizer through ``base_config.quantization_config``;
* with ``trust_remote_code=True`` the shim file named in ``auto_map`` imports hf_compress, which registers all
  of the above, so the checkpoint loads without an explicit import.

In memory, a compressed model's config is an instance of a small subclass of its native config class
(``HfCompressLlamaConfig(LlamaConfig)``) whose only change is that ``save_pretrained`` writes the wrapped form.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .version import __version__
from .config import QUANT_METHOD, CompressionConfig
from .errors import CheckpointError

MODEL_TYPE = "hf_compress"

#: the file a checkpoint carries so that ``trust_remote_code=True`` loads it (named in its ``auto_map``)
SHIM_MODULE = "hf_compress_autoload"
SHIM_SOURCE = '''"""Loads an hf-compress checkpoint with trust_remote_code=True. Needs: pip install hf-compress"""
from hf_compress.auto import CompressedConfig, CompressedModel, CompressedModelForCausalLM  # noqa: F401
'''


def write_shim(directory: str | os.PathLike) -> None:
    Path(directory, SHIM_MODULE + ".py").write_text(SHIM_SOURCE, encoding="utf-8")


def is_compressed_config(config) -> bool:
    q = getattr(config, "quantization_config", None)
    if isinstance(q, dict):
        return q.get("quant_method") == QUANT_METHOD
    return isinstance(q, CompressionConfig)


class _CompressedConfigMixin:
    """Mixed into a native config class: save the hf-compress wrapped form when the model is compressed."""

    _hf_compress_native = True

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        if not is_compressed_config(self):
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        CompressedConfig(base_config=self).save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_shim(save_directory)


_NATIVE_SUBCLASSES: dict[type, type] = {}


def compressed_config_class(base_cls: type) -> type:
    """The (cached) ``HfCompress<Base>`` subclass of a native config class."""
    if getattr(base_cls, "_hf_compress_native", False):
        return base_cls
    if base_cls not in _NATIVE_SUBCLASSES:
        name = f"HfCompress{base_cls.__name__}"
        cls = type(name, (_CompressedConfigMixin, base_cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, cls)  # importable by name, so configs pickle
        _NATIVE_SUBCLASSES[base_cls] = cls
    return _NATIVE_SUBCLASSES[base_cls]


def __getattr__(name: str):
    # Unpickling in a fresh process: rebuild HfCompress<Base> on first use.
    if name.startswith("HfCompress") and name.endswith("Config"):
        import transformers

        base = getattr(transformers, name[len("HfCompress"):], None)
        if isinstance(base, type) and issubclass(base, PreTrainedConfig):
            return compressed_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def own_config(model) -> None:
    """Give ``model`` a config object of its own (a deep copy), so that compressing it never changes the caller's
    config (``from_config(c)`` keeps ``c`` as ``model.config``; `use_compressed_config_class`, ``untie`` and the
    ``quantization_config`` would otherwise land on ``c``). Every submodule that held the old config or one of its
    sub-configs (``text_config``, ``vision_config``, ...) is pointed at the copy's counterpart."""
    import copy

    old = getattr(model, "config", None)
    if not isinstance(old, PreTrainedConfig):
        return
    new = copy.deepcopy(old)
    swap = {id(old): new}
    for key, value in vars(old).items():
        if isinstance(value, PreTrainedConfig):
            swap[id(value)] = getattr(new, key)
    for module in model.modules():
        held = module.__dict__.get("config")
        if held is not None and id(held) in swap:
            module.__dict__["config"] = swap[id(held)]


def use_compressed_config_class(model) -> None:
    """Give ``model.config`` (shared by its sub-models) the wrapping subclass of its own class."""
    config = model.config
    config.__class__ = compressed_config_class(type(config))


def native_config_from_dict(base: dict, **kwargs):
    model_type = base.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"hf-compress checkpoint wraps a model of type {model_type!r}, which this transformers does not know."
        )
    return compressed_config_class(CONFIG_MAPPING[model_type]).from_dict(dict(base), **kwargs)


class CompressedConfig(PreTrainedConfig):
    """The on-disk wrapper of a compressed checkpoint's config (``model_type: "hf_compress"``).

    ``AutoConfig.from_pretrained(compressed_dir)`` returns one; ``.base_config`` is the native config."""

    model_type = MODEL_TYPE
    has_no_defaults_at_init = True  # a wrapper: `CompressedConfig()` has no defaults to compare against

    def __init__(self, base_config=None, hf_compress_version: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(base_config, dict):
            base_config = native_config_from_dict(base_config)
        self.base_config = base_config
        self.hf_compress_version = hf_compress_version or __version__

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        if not isinstance(config_dict.get("base_config"), dict):
            raise CheckpointError("config.json has model_type 'hf_compress' but no 'base_config' section.")
        base, unused = native_config_from_dict(config_dict["base_config"], return_unused_kwargs=True, **kwargs)
        if not is_compressed_config(base):
            raise CheckpointError("config.json of an hf-compress checkpoint lacks its quantization_config.")
        config = cls(base_config=base, hf_compress_version=config_dict.get("hf_compress_version"))
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        # Registration happens on import of hf_compress; copying our source into checkpoints is not wanted.
        pass

    def to_dict(self):
        base = self.base_config.to_dict()
        return {
            "model_type": MODEL_TYPE,
            "architectures": base.get("architectures"),
            "auto_map": {name: f"{SHIM_MODULE}.{cls.__name__}" for name, cls in _auto_entries().items()},
            "hf_compress_version": self.hf_compress_version,
            "transformers_version": base.get("transformers_version"),
            "base_config": base,
        }

    def to_diff_dict(self):
        return self.to_dict()


class _CompressedAutoModel:
    """Registered with an ``AutoModel*`` class for `CompressedConfig`; returns the *native* model class."""

    config_class = CompressedConfig
    _auto_class = None  # the transformers Auto class whose mapping names the native class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if config is None:
            config, kwargs = CompressedConfig.from_pretrained(
                pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs
            )
        base = config.base_config if isinstance(config, CompressedConfig) else config
        native_cls = native_model_class(cls._auto_class, type(base))
        return native_cls.from_pretrained(pretrained_model_name_or_path, *model_args, config=base, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class=None):
        pass


def native_model_class(auto_class, config_cls: type):
    mapping = auto_class._model_mapping
    for klass in config_cls.__mro__:
        if klass is not CompressedConfig and klass in mapping:
            return mapping[klass]
    others = [a.__name__ for a in _AUTO_CLASSES if a is not auto_class and any(
        k is not CompressedConfig and k in a._model_mapping for k in config_cls.__mro__)]
    advice = f"; load it with {' or '.join(others[:2])} (or its own class)" if others else ""
    raise CheckpointError(f"{auto_class.__name__} has no model class for {config_cls.__name__}{advice}.")


_AUTO_CLASSES = (
    AutoModelForCausalLM,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForImageTextToText,
)


def _make_entry(auto_class) -> type:
    name = "Compressed" + auto_class.__name__.removeprefix("Auto")
    return type(name, (_CompressedAutoModel,), {"_auto_class": auto_class, "__module__": __name__, "__qualname__": name})


CompressedModelForCausalLM = _make_entry(AutoModelForCausalLM)
CompressedModel = _make_entry(AutoModel)
_ENTRIES = {CompressedModelForCausalLM.__name__: CompressedModelForCausalLM, CompressedModel.__name__: CompressedModel}
for _auto in _AUTO_CLASSES[2:]:
    _entry = _make_entry(_auto)
    _ENTRIES[_entry.__name__] = _entry
    globals()[_entry.__name__] = _entry


def _auto_entries() -> dict[str, type]:
    """auto_map: the shim exposes the config and the two entries most loads use."""
    return {"AutoConfig": CompressedConfig, "AutoModelForCausalLM": CompressedModelForCausalLM, "AutoModel": CompressedModel}


def register() -> None:
    """Idempotent: register the config with AutoConfig and the factories with the AutoModel classes."""
    AutoConfig.register(MODEL_TYPE, CompressedConfig, exist_ok=True)
    for auto_class in _AUTO_CLASSES:
        entry = _ENTRIES["Compressed" + auto_class.__name__.removeprefix("Auto")]
        auto_class.register(CompressedConfig, entry, exist_ok=True)
