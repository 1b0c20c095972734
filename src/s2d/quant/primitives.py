"""Affine quantization: one quantize/dequantize family parameterized by bits, symmetry and block size.

As in torchao, a *block size* names the granularity: one scale (and zero point) per block of the tensor.
For a weight (out, in) or an activation (..., in):

    per_tensor   block = the whole tensor
    per_channel  block = (1, in)         one scale per output channel of a weight
    per_token    block = (1, ..., 1, in) one scale per token of an activation (the same block shape)
    per_group    block = (1, ..., 1, g)  g consecutive input channels share a scale

Scales have the "compact" shape `x.shape[i] // block[i]` per dimension. Integer ranges follow GPTQ/QuaRot:
symmetric codes lie in [-2^(b-1), 2^(b-1)-1]; asymmetric codes lie in [0, 2^b-1] with a zero point, over a
range widened to include 0 so that 0 is exact (as torch.ao does). Two symmetric grids:
- "restricted" (QuaRot's sym_quant): scale = absmax / (2^(b-1)-1), so codes -(2^(b-1)-1)..2^(b-1)-1 are used
  (15 levels at 4 bits);
- "full" (GPTQ's reference quantizer): scale = 2·absmax / (2^b-1), so all 2^b codes are used.
A clip ratio c < 1 shrinks each block's observed range to c·[lo, hi] before the scale is taken (QuaRot's
activation clipping: 0.9 per token); values beyond it saturate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from s2d.errors import S2DError

GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_group")
OBSERVERS = ("minmax", "percentile", "mse")
GRIDS = ("restricted", "full")
MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise S2DError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}; 8, 6, 4 and 3 are "
                       "the usual choices (use no quantization at all for full precision)")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor kind (weights or activations) is quantized."""

    bits: int
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int | None = None
    observer: str = "minmax"
    percentile: float = 99.9  # for observer="percentile": the share of |x| (or of each tail) kept in range
    clip: float = 1.0  # the observed range is shrunk to clip·[lo, hi] (minmax and percentile observers)
    grid: str = "restricted"  # symmetric grids: "restricted" (QuaRot, 2^b - 1 levels) or "full" (GPTQ, 2^b)

    def __post_init__(self):
        check_bits(self.bits)
        if isinstance(self.clip, bool) or not isinstance(self.clip, int | float) or not 0 < self.clip <= 1:
            raise S2DError(f"a clip ratio must be in (0, 1] (QuaRot clips activations at 0.9), got {self.clip!r}")
        if self.grid not in GRIDS:
            raise S2DError(f"unknown symmetric grid {self.grid!r}; use one of {', '.join(GRIDS)}")
        if self.granularity not in GRANULARITIES:
            raise S2DError(f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "per_group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise S2DError(f"per_group quantization needs a positive group size: set w_group_size (e.g. 32, 64 "
                           f"or 128), got {self.group_size!r}")
        if self.observer not in OBSERVERS:
            raise S2DError(f"unknown range observer {self.observer!r}; use one of {', '.join(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise S2DError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def int_dtype(self) -> torch.dtype:
        """The narrowest integer dtype safetensors can store that holds every code."""
        if self.symmetric:
            return torch.int8 if self.bits <= 8 else torch.int16
        return torch.uint8 if self.bits <= 8 else torch.int32

    def block_size(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """The block size this granularity gives a tensor of `shape` (last dimension = input channels)."""
        shape = tuple(shape)
        if self.granularity == "per_tensor":
            return shape
        if self.granularity == "per_group":
            if shape[-1] % self.group_size:
                raise S2DError(f"group size {self.group_size} does not divide the input size {shape[-1]}; pick a "
                               f"divisor of {shape[-1]} (e.g. {_divisor_hint(shape[-1])}) or per_channel")
            return (1,) * (len(shape) - 1) + (self.group_size,)
        return (1,) * (len(shape) - 1) + (shape[-1],)


def _divisor_hint(n: int) -> str:
    return ", ".join(str(g) for g in (32, 64, 128, 96, 48) if n % g == 0) or "1"


# -- blocks: view a tensor as (*n_blocks, block_elements) and back ---------------------------------------------


def to_blocks(x: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
    """View `x` as (*[d_i // b_i], prod(b_i)): one row of elements per quantization block."""
    if len(block_size) != x.dim() or any(d % b for d, b in zip(x.shape, block_size, strict=True)):
        raise S2DError(f"block size {tuple(block_size)} does not tile a tensor of shape {tuple(x.shape)}")
    counts = [d // b for d, b in zip(x.shape, block_size, strict=True)]
    inter = [v for n, b in zip(counts, block_size, strict=True) for v in (n, b)]
    order = list(range(0, 2 * x.dim(), 2)) + list(range(1, 2 * x.dim(), 2))
    return x.reshape(inter).permute(order).reshape(*counts, -1)


def from_blocks(xb: torch.Tensor, shape: tuple[int, ...], block_size: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_blocks`."""
    counts = [d // b for d, b in zip(shape, block_size, strict=True)]
    n = len(shape)
    order = [0] * (2 * n)
    for i in range(n):  # the blocked view holds (n_0..n_k, b_0..b_k); interleave back to (n_0, b_0, ...)
        order[2 * i], order[2 * i + 1] = i, n + i
    return xb.reshape((*counts, *block_size)).permute(order).reshape(shape)  # a tuple: a 0-d shape is ()


# -- observers: the range each block is quantized over ----------------------------------------------------------


def _range_minmax(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return xb.amin(-1), xb.amax(-1)


def _range_percentile(xb: torch.Tensor, pct: float) -> tuple[torch.Tensor, torch.Tensor]:
    # kthvalue rather than torch.quantile: quantile refuses inputs above 2^24 elements.
    m = xb.shape[-1]
    k = min(m, max(1, math.ceil(pct / 100.0 * m)))
    return xb.kthvalue(m - k + 1, -1).values, xb.kthvalue(k, -1).values


def _range_mse(xb: torch.Tensor, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8):
    """Shrink each block's min-max range by the factor (1 - i/grid) that minimizes its squared error.

    The same grid search as GPTQ's reference quantizer (`mse=True`, 100 steps, up to 80% shrink).
    """
    lo, hi = _range_minmax(xb)
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = torch.full_like(lo, float("inf"))
    for i in range(int(max_shrink * grid)):
        c = 1.0 - i / grid
        scale, zero = _qparams_from_range(c * lo, c * hi, spec)
        err = (_fake_blocks(xb, scale, zero, spec) - xb).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, c * lo, best_lo), torch.where(better, c * hi, best_hi)
    return best_lo, best_hi


def observe_range(x: torch.Tensor, spec: QuantSpec, block_size: tuple[int, ...] | None = None):
    """(lo, hi) per block of `x` under the spec's observer; both have the compact block-count shape."""
    xb = to_blocks(x.detach(), spec.block_size(x.shape) if block_size is None else block_size)
    if spec.observer == "mse":
        return _range_mse(xb, spec)  # the search chooses its own clipping
    lo, hi = _range_percentile(xb, spec.percentile) if spec.observer == "percentile" else _range_minmax(xb)
    return (lo, hi) if spec.clip == 1 else (lo * spec.clip, hi * spec.clip)


def _qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        levels = spec.qmax + 0.5 if spec.grid == "full" else spec.qmax  # 2·absmax/(2^b-1) or absmax/(2^(b-1)-1)
        scale = torch.where(amax > 0, amax / levels, torch.ones_like(amax))
        return scale, None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = hi - lo
    scale = torch.where(span > 0, span / spec.qmax, torch.ones_like(span))
    zero = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """(scale, zero_point) for ranges [lo, hi]; zero_point is None for symmetric specs, else integer-valued."""
    scale, zero = _qparams_from_range(lo.float(), hi.float(), spec)
    return scale, (None if zero is None else zero.to(spec.int_dtype))


def choose_qparams(x: torch.Tensor, spec: QuantSpec, block_size: tuple[int, ...] | None = None):
    """(scale, zero_point) per block of `x`, from the spec's observer."""
    lo, hi = observe_range(x, spec, block_size)
    return qparams_from_range(lo, hi, spec)


# -- quantize / dequantize ----------------------------------------------------------------------------------------


def _fake_blocks(xb, scale, zero, spec: QuantSpec) -> torch.Tensor:
    s = scale.unsqueeze(-1)
    if zero is None:
        return torch.round(xb / s).clamp(spec.qmin, spec.qmax) * s
    z = zero.unsqueeze(-1).to(xb.dtype)
    return (torch.round(xb / s).add(z).clamp(spec.qmin, spec.qmax) - z) * s


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
                    block_size: tuple[int, ...] | None = None) -> torch.Tensor:
    """Integer codes clamp(round(x / scale) + zero_point, qmin, qmax), in the spec's integer dtype."""
    block_size = spec.block_size(x.shape) if block_size is None else block_size  # () is a 0-d tensor's block
    xb = to_blocks(x, block_size)
    q = torch.round(xb / scale.unsqueeze(-1).to(xb.dtype))
    if zero_point is not None:
        q = q + zero_point.unsqueeze(-1).to(q.dtype)
    q = q.clamp(spec.qmin, spec.qmax).to(spec.int_dtype)
    return from_blocks(q, tuple(x.shape), block_size)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      block_size: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - zero_point) * scale, blockwise, in `dtype`."""
    qb = to_blocks(q, block_size).to(dtype)
    if zero_point is not None:
        qb = qb - zero_point.unsqueeze(-1).to(dtype)
    return from_blocks(qb * scale.unsqueeze(-1).to(dtype), tuple(q.shape), block_size)


def ste(x: torch.Tensor, x_quant: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the forward value of `x_quant`, the gradient of the identity in `x`."""
    if not x.requires_grad:
        return x_quant
    return x + (x_quant - x).detach()


def lsq_fake_quantize(w: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize `w` with a *learnable* symmetric scale (LSQ, Esser et al. 2020), one per broadcast block.

    Only the rounding is straight-through; the clamp is not, so weights outside the range get no gradient
    and the scale gets LSQ's gradient (round(w/s) − w/s inside the range, qmin or qmax outside).
    """
    q = (w / scale).clamp(spec.qmin, spec.qmax)
    q = q + (torch.round(q) - q).detach()
    return q * scale


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                  zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize `x` (dynamic qparams unless given), with an STE for gradients."""
    block_size = spec.block_size(x.shape)
    if scale is None:
        scale, zero_point = choose_qparams(x, spec, block_size)
    if spec.granularity in ("per_token", "per_channel"):
        # The hot path for activations: the compact scale (..., 1) already broadcasts, so skip the block view.
        s = scale.reshape(*x.shape[:-1], 1).to(x.dtype)
        z = None if zero_point is None else zero_point.reshape(*x.shape[:-1], 1).to(x.dtype)
        xd = x.detach()
        if z is None:
            xq = torch.round(xd / s).clamp_(spec.qmin, spec.qmax).mul_(s)
        else:
            xq = torch.round(xd / s).add_(z).clamp_(spec.qmin, spec.qmax).sub_(z).mul_(s)
    else:
        xq = from_blocks(_fake_blocks(to_blocks(x.detach(), block_size), scale.to(x.dtype),
                                      zero_point, spec), tuple(x.shape), block_size)
    return ste(x, xq)

