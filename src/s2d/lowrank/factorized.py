"""FactorizedLinear: two Linears, A (r×d_in) then B (d_out×r, optional bias), standing in for one Linear."""

from __future__ import annotations

import torch
from torch import nn

from s2d.errors import S2DError


def break_even_rank(d_in: int, d_out: int) -> float:
    """κ = d_in·d_out/(d_in+d_out): at rank κ the two factors hold as many weights as the dense matrix."""
    return d_in * d_out / (d_in + d_out)


def check_rank(rank: int, d_in: int, d_out: int, name: str = "layer") -> int:
    """`rank` as an int, or S2DError if it is not in 1..min(d_in, d_out)."""
    if not is_whole(rank) or not 1 <= rank <= min(d_in, d_out):
        raise S2DError(f"rank {rank!r} for {name} ({d_out}x{d_in}) must be an integer in 1..{min(d_in, d_out)}")
    return int(rank)


def is_whole(value) -> bool:
    """An integer, or a float with an integer value (YAML and JSON may give either); never a bool."""
    return not isinstance(value, bool) and isinstance(value, int | float) and float(value).is_integer()


def check_finite(name: str, weight: torch.Tensor | None = None, stats=None) -> None:
    """NaN or Inf in a weight or in calibration sums makes LAPACK fail, or return NaN factors, without saying
    which layer or why: name the Linear and the culprit before any decomposition. `stats` has `.sums`."""
    if weight is not None and not torch.isfinite(weight).all():
        raise S2DError(f"the weight of {name} holds NaN or Inf values, so it cannot be decomposed: the checkpoint "
                       "is damaged or training diverged; reload or repair the model, or leave this Linear out "
                       "(filter=, or ranks for other roles)")
    if stats is not None and not all(torch.isfinite(t).all() for t in stats.sums):
        raise S2DError(f"the calibration activations reaching {name} hold NaN or Inf values: a layer before it "
                       "overflows or has non-finite weights; check the model on this data (s2d diagnose), run it "
                       "in float32, or use method='svd', which needs no calibration")


def factorized_params(rank: int, d_in: int, d_out: int, bias: bool) -> int:
    return rank * (d_in + d_out) + (d_out if bias else 0)


def dense_params(d_in: int, d_out: int, bias: bool) -> int:
    return d_in * d_out + (d_out if bias else 0)


def saves_parameters(rank: int, d_in: int, d_out: int, factor_bias: bool, dense_bias: bool) -> bool:
    """True when the factorized layer, bias included, is strictly smaller than the dense one."""
    return factorized_params(rank, d_in, d_out, factor_bias) < dense_params(d_in, d_out, dense_bias)


class FactorizedLinear(nn.Module):
    """y = B(A x) + b. Built from float64 factors; exact at full rank when the factors are."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = check_rank(rank, in_features, out_features)
        self.A = nn.Linear(in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(self.rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> FactorizedLinear:
        """From A (r×d_in), B (d_out×r) and an optional bias (d_out), cast to `dtype`."""
        rank, d_in = a.shape
        d_out = b.shape[0]
        if b.shape[1] != rank or (bias is not None and bias.shape != (d_out,)):
            raise S2DError(f"factor shapes do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}, "
                           f"bias {None if bias is None else tuple(bias.shape)}")
        layer = cls(d_in, d_out, rank, bias=bias is not None, device=a.device, dtype=dtype)
        with torch.no_grad():
            layer.A.weight.copy_(a)
            layer.B.weight.copy_(b)
            if bias is not None:
                layer.B.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def has_bias(self) -> bool:
        return self.B.bias is not None

    # The two sides a one-sided weight rewrite turns (s2d.arch.fold.input_side / output_side).
    @property
    def input_linear(self) -> nn.Linear:
        return self.A

    @property
    def output_linear(self) -> nn.Linear:
        return self.B

    def num_parameters(self) -> int:
        return factorized_params(self.rank, self.in_features, self.out_features, self.has_bias)

    def macs_per_token(self) -> int:
        """Multiply-accumulates for one input row: r·d_in for A plus d_out·r for B."""
        return self.rank * (self.in_features + self.out_features)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """The equivalent dense Linear, W = B·A (computed in float64), for merged exports."""
        w = self.B.weight.double() @ self.A.weight.double()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.has_bias,
                          device=w.device, dtype=self.A.weight.dtype)
        dense.weight.copy_(w)
        if self.has_bias:
            dense.bias.copy_(self.B.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.has_bias}"


def linear_macs(module: nn.Module) -> int:
    """MACs per input row of a Linear or FactorizedLinear."""
    if isinstance(module, FactorizedLinear):
        return module.macs_per_token()
    return module.in_features * module.out_features


class Factors:
    """Rank-ordered float64 factors of one Linear, computed once and cut at any rank up to `max_rank`.

    W ≈ b[:, :r] · a[:r]; the bias at rank r is `bias + b[:, :r] @ bias_coef[:r]` (rom's mean compensation
    needs the rank; svd and asvd keep the layer's own bias). `energy` is the spectrum the order came from.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                 bias_coef: torch.Tensor | None = None, energy: torch.Tensor | None = None):
        self.a, self.b, self.bias, self.bias_coef, self.energy = a, b, bias, bias_coef, energy
        self.d_in, self.d_out = a.shape[1], b.shape[0]

    @property
    def max_rank(self) -> int:
        return self.a.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.bias is not None or self.bias_coef is not None

    def bias_at(self, rank: int) -> torch.Tensor | None:
        if self.bias_coef is None:
            return self.bias
        base = self.bias if self.bias is not None else torch.zeros_like(self.b[:, 0])
        return base + self.b[:, :rank] @ self.bias_coef[:rank]

    def linear(self, rank: int, dtype: torch.dtype = torch.float32) -> FactorizedLinear:
        """The FactorizedLinear at `rank` (1..max_rank)."""
        if not 1 <= rank <= self.max_rank:
            raise S2DError(f"rank {rank} is outside 1..{self.max_rank} for these factors")
        return FactorizedLinear.from_factors(self.a[:rank], self.b[:, :rank], self.bias_at(rank), dtype=dtype)
