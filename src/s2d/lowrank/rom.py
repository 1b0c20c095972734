"""Feature space (LLM-ROM): project each layer's outputs on the top eigenvectors of their covariance.

With V_r the top-r eigenvectors of the centred output covariance C and μ the output mean, the layer
y = Wx + b becomes ŷ = V_rV_rᵀ(y − μ) + μ, i.e. A = V_rᵀW (bias-free) and B = V_r with bias
μ + V_rV_rᵀ(b − μ) = (I − V_rV_rᵀ)μ + V_rV_rᵀb (SPEC §4). Unlike the original code we use `eigh` on the
symmetric C, sort descending, and keep the mean compensation (which makes the mean output exact).
"""

from __future__ import annotations

import torch

from s2d.errors import S2DError
from s2d.lowrank.asvd import InputGram
from s2d.lowrank.factorized import Factors


class OutputStats:
    """Streaming ΣYᵀY, ΣY and the row count of a layer's outputs, in float64; Y itself is never kept."""

    def __init__(self, d_out: int):
        self.yty = torch.zeros(d_out, d_out, dtype=torch.float64)
        self.y_sum = torch.zeros(d_out, dtype=torch.float64)
        self.n = 0

    def update(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).double()
        self.yty.addmm_(y.T, y)
        self.y_sum += y.sum(0)
        self.n += y.shape[0]

    @classmethod
    def from_inputs(cls, gram: InputGram, weight: torch.Tensor, bias: torch.Tensor | None) -> OutputStats:
        """The same sums for Y = XWᵀ + b, from the input's ΣXᵀX and ΣX: ΣYᵀY = W(ΣXᵀX)Wᵀ + W(ΣX)bᵀ + b(ΣX)ᵀWᵀ
        + n bbᵀ. Linears that share an input (gate and up) then share one d_in×d_in sum, much cheaper than a
        d_out×d_out sum each when d_out > d_in."""
        w = weight.detach().double()
        stats = cls(w.shape[0])
        stats.yty = w @ gram.xtx @ w.T
        stats.y_sum = w @ gram.x_sum
        if bias is not None:
            b = bias.detach().double()
            wsb = torch.outer(stats.y_sum, b)
            stats.yty += wsb + wsb.T + gram.n * torch.outer(b, b)
            stats.y_sum += gram.n * b
        stats.n = gram.n
        return stats

    def mean(self) -> torch.Tensor:
        return self.y_sum / self.n

    def covariance(self) -> torch.Tensor:
        """The centred covariance ΣYᵀY/n − μμᵀ (the 1/n normalization does not change the eigenvectors)."""
        if self.n == 0:
            raise S2DError("rom saw no calibration outputs for a layer; give calibration data")
        mu = self.mean()
        cov = self.yty / self.n - torch.outer(mu, mu)
        return (cov + cov.T) / 2  # exact symmetry for eigh, against rounding in the subtraction


def principal_directions(stats: OutputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors as columns) of the output covariance, largest first, by `eigh`."""
    values, vectors = torch.linalg.eigh(stats.covariance())
    return values.flip(0), vectors.flip(1)


def rom_factors(weight: torch.Tensor, bias: torch.Tensor | None, stats: OutputStats,
                max_rank: int | None = None) -> Factors:
    """Factors of the layer from its output statistics: A = V_rᵀW, B = V_r, bias with mean compensation."""
    w = weight.detach().double()
    d_out, d_in = w.shape
    values, vectors = principal_directions(stats)
    # Beyond min(d_in, d_out) the outputs (an affine image of d_in inputs) have no variance left to keep.
    k = min(d_in, d_out) if max_rank is None else min(max_rank, d_in, d_out)
    v = vectors[:, :k].contiguous()
    mu = stats.mean()
    b0 = bias.detach().double() if bias is not None else torch.zeros(d_out, dtype=torch.float64)
    return Factors(a=v.T @ w, b=v, bias=mu, bias_coef=v.T @ (b0 - mu), energy=values.clamp_min(0))
