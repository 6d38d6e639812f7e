"""Derived tensors a layer keeps between forwards (a repacked weight, U by columns, dequantized factors): `reuse`.

Plain dicts owned by the modules (``_kernel_cache``), never part of a state dict; used by the dispatch
(`kernels.dispatch`) and by `hf_compress.modules.quant`.
"""

from __future__ import annotations


def reuse(cache: dict, name: str, src: tuple, build, key=None):
    """``cache[name]``, built with ``build()`` on first use and kept in ``cache`` (a plain dict the caller owns, never
    part of a state dict) until a tensor of ``src`` is replaced, changed in place (identity and version counter) or
    given other data (its data pointer: ``Module.to()`` swaps a parameter's data keeping its identity and version
    counter), or ``key`` changes. Asked at every forward, so the check is a loop of identity and integer
    comparisons (no tuple built per call: at one row a layer's whole kernel call is ~20 us). Inference tensors
    (made under ``torch.inference_mode``) have no version counter: only their replacement or new data is seen."""
    seen = cache.get("seen")
    if seen is not None and cache["key"] == key and len(seen) == len(src):
        for t, (held, version, ptr) in zip(src, seen):
            if t is not held or t.data_ptr() != ptr or (version is not None and t._version != version):
                break
        else:
            return cache[name]
    cache.clear()  # drop the old value before building the new one
    value = build()
    cache.update({name: value, "key": key,
                  "seen": tuple((t, None if t.is_inference() else t._version, t.data_ptr()) for t in src)})
    return value
