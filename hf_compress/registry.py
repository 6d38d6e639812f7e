"""The registries of compression methods and of rotations, looked up by the names used in configs and on the command
line."""

from __future__ import annotations

from typing import Callable, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            cls.name = name
            self._entries[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"Unknown {self.kind} {name!r}; available: {', '.join(sorted(self._entries)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)


METHODS = Registry("compression method")
#: orthogonal matrices for ``rotate`` (registered in `hf_compress.transforms.rotation`)
ROTATIONS = Registry("rotation")
