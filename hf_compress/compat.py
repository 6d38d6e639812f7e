"""What differs between the transformers releases hf-compress supports (pyproject's range), in one place.

Every dependence on a transformers / PEFT / accelerate internal is listed in docs/compatibility.md and guarded by
tests/test_compat.py, whose failures name the internal that moved.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` / ``model.generate(...)``: transformers 5.24 renamed the argument
    ``past_key_values`` to ``cache`` (the old name is deprecated there, an error from 5.40 on); earlier releases
    know only ``past_key_values``. Read off the model's own ``forward`` signature, not the version number."""
    return {_cache_keyword(type(model)): cache}
