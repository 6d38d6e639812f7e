"""`QuantLinear` (y = dequant(Q)·x + U(Vx) + b) and `QuantLowRankLinear` (a low-rank layer with quantized factors).

Storage only; the quantizers that fill them live in `hf_compress.methods` and the kernels that run them in
`hf_compress.kernels` (packed layout: `hf_compress.kernels.reference.weights`). Neither is an `nn.Linear` subclass, so
PEFT's default LoRA dispatch cannot mistake them for dense layers.

``qweight`` / ``scales`` / ``zeros`` are buffers (persistent, saved in safetensors, never trained); the
optional low-rank compensation factors ``U`` [out, r] and ``V`` [r, in] of a `QuantLinear` (EoRA) are
parameters — the part PEFT fine-tuning can train (LQ-LoRA style) — or, with ``factor_bits``, packed codes
themselves (frozen): ``V_qweight/V_scales/V_zeros`` hold V [r, in] grouped along ``in`` and
``U_qweight/U_scales/U_zeros`` hold Uᵀ [r, out] grouped along ``out``. Both are stored rank-major, so keeping
the first k components of the path is slicing rows, whatever the storage.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import SCALE_DTYPES, SUPPORTED_BITS, dequantize, packed_words, quant_linear, reuse
from ..kernels.dispatch import decode_path
from .base import CompressedModule, LowRankPath
from .lowrank import SOURCES, dense_module

#: the buffers of quantized compensation factors, in (qweight, scales, zeros) order for Uᵀ then V
FACTOR_BUFFERS = ("U_qweight", "U_scales", "U_zeros", "V_qweight", "V_scales", "V_zeros")
#: the scales / zeros dtypes a QuantLinear stores (of `kernels.SCALE_DTYPES`; float32 is the KV cache's only)
WEIGHT_SCALE_DTYPES = {name: SCALE_DTYPES[name] for name in ("float16", "bfloat16")}


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def check_quant_args(bits: int, group_size: int, in_features: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if in_features < 1:
        raise ValueError(f"in_features must be positive, got {in_features}")


def _scale_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return WEIGHT_SCALE_DTYPES[name]
    except KeyError:
        raise ValueError(f"scale_dtype must be one of {sorted(WEIGHT_SCALE_DTYPES)}, got {name!r}") from None


class QuantLinear(CompressedModule, LowRankPath):
    """Group-wise asymmetric low-bit linear layer, optionally with a low-rank error-compensation path.

    ``group_size`` need not divide ``in_features``: the last group is then partial (nothing is padded). Float
    compensation factors change only through `LowRankPath` (`set_factors`, `append_rank`, `truncate_rank`), quantized
    ones through `set_quantized_factors`, `dequantize_factors` and `truncate_rank`."""

    type_name = "quant"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, rank: int = 0,
                 bias: bool = True, source: str = "linear", scale_dtype="float16", factor_bits: int = 0,
                 factor_group_size: int = 128, device=None, dtype=None):
        super().__init__()
        check_quant_args(bits, group_size, in_features)
        if factor_bits:
            check_quant_args(factor_bits, factor_group_size, in_features)
        if rank < 0 or rank > min(in_features, out_features):
            raise ValueError(f"rank must be in [0, min(out, in)] = [0, {min(in_features, out_features)}], got {rank}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.source = source
        self._dtype = dtype or torch.get_default_dtype()  # dtype of the dense weight this layer stands for
        sdt = _scale_dtype(scale_dtype)
        ng = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, ng, dtype=sdt, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=sdt, device=device))
        kw = {"device": device, "dtype": dtype}
        self.factor_bits, self.factor_group_size = (factor_bits, factor_group_size) if rank and factor_bits else (0, 0)
        float_factors = rank and not self.factor_bits
        self.U = nn.Parameter(torch.zeros(out_features, rank, **kw)) if float_factors else None
        self.V = nn.Parameter(torch.zeros(rank, in_features, **kw)) if float_factors else None
        if self.factor_bits:
            shapes = self._factor_shapes(rank, factor_bits, factor_group_size)
            for name, shape in shapes.items():
                if name.endswith("qweight"):
                    t = torch.zeros(shape, dtype=torch.int32, device=device)
                else:  # scales start at 1, zeros at 0 (like the layer's own)
                    t = (torch.ones if name.endswith("scales") else torch.zeros)(shape, dtype=sdt, device=device)
                self.register_buffer(name, t)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self._kernel_cache: dict = {}  # the CPU kernel's repacked weight (`kernels.dispatch.cpu_pack`); not state

    @property
    def rank(self) -> int:
        if self.factor_bits:
            return self.V_qweight.shape[0]
        return 0 if self.U is None else self.U.shape[1]

    def factors(self, dtype=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(U [out, r], V [r, in]) of the compensation path — the parameters, or the quantized factors dequantized
        to ``dtype`` (default: the compute dtype); (None, None) without one."""
        if not self.factor_bits:
            return self.U, self.V
        dtype = dtype or self.compute_dtype
        fb, fg = self.factor_bits, self.factor_group_size
        u = dequantize(self.U_qweight, self.U_scales, self.U_zeros, fb, fg, self.out_features, dtype).T
        v = dequantize(self.V_qweight, self.V_scales, self.V_zeros, fb, fg, self.in_features, dtype)
        return u, v

    def set_quantized_factors(self, u_codes, v_codes, bits: int, group_size: int) -> None:
        """Store the compensation path as packed codes: ``u_codes`` = (qweight, scales, zeros) of Uᵀ [r, out] grouped
        along ``out``, ``v_codes`` the same for V [r, in] along ``in`` (rank-major, layout of
        `kernels.reference.weights`)."""
        check_quant_args(bits, group_size, self.in_features)
        rank = u_codes[0].shape[0]
        shapes = self._factor_shapes(rank, bits, group_size)
        for name, t in zip(FACTOR_BUFFERS, (*u_codes, *v_codes)):
            want = shapes[name]
            if tuple(t.shape) != want:
                raise ValueError(f"{name}: packed shape {tuple(t.shape)} does not match {want} for rank={rank}, "
                                 f"factor_bits={bits}, factor_group_size={group_size}")
        self.U = self.V = None
        device = self.qweight.device
        for name, t in zip(FACTOR_BUFFERS, (*u_codes, *v_codes)):
            t = t.to(device=device, dtype=torch.int32 if name.endswith("qweight") else u_codes[1].dtype)
            self.register_buffer(name, t.contiguous())
        self.factor_bits, self.factor_group_size = bits, group_size

    def _factor_shapes(self, rank: int, bits: int, group_size: int) -> dict[str, tuple[int, int]]:
        """Shapes of the `FACTOR_BUFFERS` for the rank-major packed Uᵀ [r, out] and V [r, in]."""
        shapes = {}
        for part, n in (("U", self.out_features), ("V", self.in_features)):
            shapes[f"{part}_qweight"] = (rank, packed_words(n, bits))
            shapes[f"{part}_scales"] = shapes[f"{part}_zeros"] = (rank, n_groups(n, group_size))
        return shapes

    def dequantize_factors(self) -> None:
        """Turn quantized compensation factors into ordinary (trainable-shaped) parameters holding exactly the values
        the forward computes with (used before appending a LoRA adapter to the path)."""
        if not self.factor_bits:
            return
        self.set_factors(*self.factors())  # (set_factors drops the quantized ones)

    def _drop_factor_buffers(self) -> None:
        for name in FACTOR_BUFFERS:
            if name in self._buffers:
                del self._buffers[name]
        self.factor_bits = self.factor_group_size = 0

    @property
    def rank_bits(self) -> int:
        """Storage bits one component of the compensation path takes (a column of U plus a row of V)."""
        if self.factor_bits:
            return sum(getattr(self, n)[:1].numel() * getattr(self, n).element_size() * 8 for n in FACTOR_BUFFERS)
        size = self.U.element_size() * 8 if self.U is not None else torch.finfo(self.compute_dtype).bits
        return (self.out_features + self.in_features) * size

    @property
    def compute_dtype(self) -> torch.dtype:
        for t in (self.bias, self.U):
            if t is not None:
                return t.dtype
        return self._dtype

    @classmethod
    def from_codes(cls, qweight, scales, zeros, bits: int, group_size: int, in_features: int, bias=None, u=None,
                   v=None, source: str = "linear", dtype=None, device=None) -> "QuantLinear":
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        device = device or qweight.device
        rank = 0 if u is None else u.shape[1]
        m = cls(in_features, qweight.shape[0], bits, group_size, rank=rank, bias=bias is not None, source=source,
                scale_dtype=scales.dtype, device="meta", dtype=dtype)
        if tuple(qweight.shape) != tuple(m.qweight.shape) or tuple(scales.shape) != tuple(m.scales.shape):
            raise ValueError(f"packed shapes {tuple(qweight.shape)}/{tuple(scales.shape)} do not match "
                             f"{tuple(m.qweight.shape)}/{tuple(m.scales.shape)} for bits={bits}, group_size={group_size}")
        m.qweight = qweight.to(device=device, dtype=torch.int32).contiguous()
        m.scales = scales.to(device).contiguous()
        m.zeros = zeros.to(device=device, dtype=scales.dtype).contiguous()
        if rank:
            m.set_factors(u, v, requires_grad=True, dtype=dtype, device=device)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone())
        return m

    def _factor_placement(self) -> tuple[torch.dtype, torch.device]:
        if self.U is not None:
            return self.U.dtype, self.U.device
        return self.compute_dtype, self.qweight.device

    def _factors_changed(self) -> None:
        if self.factor_bits:  # float factors replace quantized ones
            self._drop_factor_buffers()
        self.__dict__.pop("_factor_cache", None)  # quantized factors dequantized for the forward (`_runtime_factors`)

    def _float_factors(self) -> None:
        self.dequantize_factors()

    def truncate_rank(self, rank: int, requires_grad: bool | None = None) -> None:
        """Keep the first ``rank`` components of the low-rank path (0 removes it). The factors are SVD-ordered when
        EoRA made them, so this is the truncated SVD at that rank; quantized factors are rank-major rows quantized
        row by row, so their truncation equals quantizing the truncated factors."""
        if not 0 <= rank <= self.rank:
            raise ValueError(f"rank must be in [0, {self.rank}], got {rank}")
        if not self.factor_bits:
            return LowRankPath.truncate_rank(self, rank, requires_grad)
        if rank == 0:
            self._drop_factor_buffers()
        else:
            for name in FACTOR_BUFFERS:
                self.register_buffer(name, getattr(self, name)[:rank].contiguous())

    def _runtime_factors(self, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`factors` for a forward: quantized factors are dequantized once per dtype and kept (a plain attribute,
        never state; rebuilt when a factor buffer is replaced or changed in place) unless autograd is recording —
        at run time such a layer holds its factors in ``dtype`` as a float-factor layer does."""
        if not self.factor_bits or torch.is_grad_enabled():
            return self.factors(dtype)
        cache = self.__dict__.setdefault("_factor_cache", {})
        return reuse(cache, "factors", tuple(getattr(self, n) for n in FACTOR_BUFFERS),
                     lambda: tuple(t.contiguous() for t in self.factors(dtype)), key=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the decode path (`kernels.dispatch.decode_path`): resolved once, checked at every call, outside autograd
        fast = None if torch.is_grad_enabled() or self.factor_bits else self._kernel_cache.get("decode")
        if fast is not None:
            fits = fast[0](self._buffers, x)
            if fits:
                return fast[1](x, self.bias, self.U, self.V)
            if fits is None:  # stale: dropped, remade below
                self._kernel_cache.pop("decode", None)
        u, v = self._runtime_factors(x.dtype)
        y = quant_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features,
                         self.bias, u, v, cache=self._kernel_cache)
        if not (torch.is_grad_enabled() or self.factor_bits or "decode" in self._kernel_cache):
            decode_path(x, self._buffers, self.bits, self.group_size, self.in_features, self._kernel_cache)
        return y

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """dequant(Q) [out, in] (without the low-rank term)."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight this layer computes with: dequant(Q) + U·V (computed on access)."""
        w = self.dequantized(torch.float32)
        u, v = self.factors()
        if u is not None:
            w = w + u.float() @ v.float()
        return w.to(self.compute_dtype)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight of the layer (codes, scales, zeros, low-rank factors; no bias)."""
        n = sum(t.numel() * t.element_size() * 8 for t in (self.qweight, self.scales, self.zeros))
        return (n + self.rank * self.rank_bits) / (self.out_features * self.in_features)

    def to_dense(self) -> nn.Module:
        return dense_module(self.weight.detach(), self.bias, self.source)

    def record(self) -> dict:
        rec = {"type": self.type_name, "bits": self.bits, "group_size": self.group_size, "rank": self.rank,
               "source": self.source, "bias": self.bias is not None,
               "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}
        if self.factor_bits:
            rec.update(factor_bits=self.factor_bits, factor_group_size=self.factor_group_size)
        return rec

    @classmethod
    def from_record(cls, record: dict, in_features: int, out_features: int, device=None, dtype=None):
        return cls(in_features, out_features, int(record["bits"]), int(record["group_size"]),
                   rank=int(record.get("rank", 0)), bias=bool(record.get("bias", True)),
                   source=record.get("source", "linear"), scale_dtype=record.get("scale_dtype", "float16"),
                   factor_bits=int(record.get("factor_bits", 0)),
                   factor_group_size=int(record.get("factor_group_size", 128)), device=device, dtype=dtype)

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        shapes = {k: tuple(getattr(self, k).shape) for k in ("qweight", "scales", "zeros")}
        if self.factor_bits:
            shapes.update({k: tuple(getattr(self, k).shape) for k in FACTOR_BUFFERS})
        elif self.U is not None:
            shapes.update(U=tuple(self.U.shape), V=tuple(self.V.shape))
        if self.bias is not None:
            shapes["bias"] = (self.out_features,)
        return shapes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, bias={self.bias is not None}"
                + (f", factor_bits={self.factor_bits}, factor_group_size={self.factor_group_size}"
                   if self.factor_bits else ""))


class QuantLowRankLinear(CompressedModule):
    """A low-rank layer whose factors are quantized: y = up(down(x)) + b, ``down`` = V [r, in] and
    ``up`` = U [out, r] as bias-free `QuantLinear`s (``up`` is grouped along the rank)."""

    type_name = "lowrank_quant"

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group_size: int,
                 bias: bool = True, source: str = "linear", scale_dtype="float16", device=None, dtype=None):
        super().__init__()
        if rank <= 0 or rank > min(in_features, out_features):
            raise ValueError(f"rank must be in [1, min(out, in)] = [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.source = in_features, out_features, source
        kw = {"bias": False, "source": "linear", "scale_dtype": scale_dtype, "device": device, "dtype": dtype}
        self.down = QuantLinear(in_features, rank, bits, group_size, **kw)
        self.up = QuantLinear(rank, out_features, bits, group_size, **kw)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")

    @classmethod
    def from_parts(cls, down: QuantLinear, up: QuantLinear, bias=None, source: str = "linear") -> "QuantLowRankLinear":
        if down.bias is not None or up.bias is not None or up.in_features != down.out_features:
            raise ValueError("down/up must be bias-free QuantLinears that chain (down.out_features == up.in_features)")
        if (down.bits, down.group_size) != (up.bits, up.group_size):
            raise ValueError("down and up must share bits and group_size")
        m = cls(down.in_features, up.out_features, down.out_features, down.bits, down.group_size,
                bias=bias is not None, source=source, scale_dtype=down.scales.dtype, device="meta",
                dtype=down.compute_dtype)
        m.down, m.up = down, up
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(device=down.qweight.device, dtype=down.compute_dtype).clone())
        return m

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.down.compute_dtype

    @property
    def bits(self) -> int:
        return self.down.bits

    @property
    def group_size(self) -> int:
        return self.down.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return (self.up.dequantized() @ self.down.dequantized()).to(self.down.compute_dtype)

    @property
    def bits_per_weight(self) -> float:
        n = sum(t.numel() * t.element_size() * 8 for m in (self.down, self.up)
                for t in (m.qweight, m.scales, m.zeros))
        return n / (self.out_features * self.in_features)

    def to_dense(self) -> nn.Module:
        return dense_module(self.weight.detach(), self.bias, self.source)

    def record(self) -> dict:
        return {"type": self.type_name, "rank": self.rank, "bits": self.bits, "group_size": self.group_size,
                "source": self.source, "bias": self.bias is not None,
                "scale_dtype": str(self.down.scales.dtype).removeprefix("torch.")}

    @classmethod
    def from_record(cls, record: dict, in_features: int, out_features: int, device=None, dtype=None):
        return cls(in_features, out_features, int(record["rank"]), int(record["bits"]), int(record["group_size"]),
                   bias=bool(record.get("bias", True)), source=record.get("source", "linear"),
                   scale_dtype=record.get("scale_dtype", "float16"), device=device, dtype=dtype)

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        shapes = {f"{part}.{k}": v for part in ("down", "up") for k, v in getattr(self, part).expected_tensors().items()}
        if self.bias is not None:
            shapes["bias"] = (self.out_features,)
        return shapes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")

