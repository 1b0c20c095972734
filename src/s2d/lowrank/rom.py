"""Feature space (LLM-ROM): project each layer's outputs on the top eigenvectors of their covariance.

With V_r the top-r eigenvectors of the centred output covariance C and μ the output mean, the layer
y = Wx + b becomes ŷ = V_rV_rᵀ(y − μ) + μ, i.e. A = V_rᵀW (bias-free) and B = V_r with bias
μ + V_rV_rᵀ(b − μ) = (I − V_rV_rᵀ)μ + V_rV_rᵀb (SPEC §4). Unlike the original code we use `eigh` on the
symmetric C, sort descending, and keep the mean compensation (which makes the mean output exact).
Where the statistics come from the layer's input (GramOutputStats), C is factored through the smaller side.
"""

from __future__ import annotations

import torch

from s2d.errors import S2DError
from s2d.lowrank.asvd import InputGram
from s2d.lowrank.factorized import Factors, check_finite


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

    @property
    def sums(self) -> tuple[torch.Tensor, ...]:
        return self.yty, self.y_sum

    def mean(self) -> torch.Tensor:
        return self.y_sum / self.n

    def covariance(self) -> torch.Tensor:
        """The centred covariance ΣYᵀY/n − μμᵀ (the 1/n normalization does not change the eigenvectors)."""
        if self.n == 0:
            raise S2DError("rom saw no calibration outputs for a layer; give calibration data")
        mu = self.mean()
        return (self.yty / self.n).sub_(torch.outer(mu, mu))

    def principal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues, eigenvectors as columns) of the covariance, largest first. `eigh` reads only the
        lower triangle, so the rounding asymmetry of the subtraction needs no symmetrizing copy."""
        values, vectors = torch.linalg.eigh(self.covariance())
        return values.flip(0), vectors.flip(1)


class GramOutputStats:
    """Output statistics of Y = XWᵀ + b kept in the input's terms: ΣXᵀX, ΣX, n and the layer itself.

    Linears that share an input (gate and up, q/k/v) share one d_in×d_in sum. The output covariance is
    C_y = W C_x Wᵀ with C_x = QΛQᵀ, so C_y = MMᵀ for M = WQΛ^½ (d_out×d_in): its eigenvectors are M's left
    singular vectors and its eigenvalues their squared singular values. The d_out×d_out matrix is never formed,
    which matters when d_out ≫ d_in (TinyLlama's gate/up: 5632² doubles and an `eigh` of that size per Linear,
    against an SVD of 5632×2048). C_y has rank ≤ min(d_in, d_out), so nothing past that is lost.
    """

    def __init__(self, gram: InputGram, weight: torch.Tensor, bias: torch.Tensor | None,
                 root: torch.Tensor | None = None):
        if gram.n == 0:
            raise S2DError("rom saw no calibration outputs for a layer; give calibration data")
        self.gram, self.weight, self.bias, self.n = gram, weight, bias, gram.n
        # Linears sharing the input share its root too: pass input_covariance_root(gram) to compute it once.
        self.root = input_covariance_root(gram) if root is None else root

    @property
    def sums(self) -> tuple[torch.Tensor, ...]:
        return self.gram.sums

    def mean(self) -> torch.Tensor:
        mu = self.weight.detach().double() @ (self.gram.x_sum / self.n)
        return mu + self.bias.detach().double() if self.bias is not None else mu

    def _m(self) -> torch.Tensor:
        return self.weight.detach().double() @ self.root

    def covariance(self) -> torch.Tensor:
        m = self._m()
        return m @ m.T

    def principal(self) -> tuple[torch.Tensor, torch.Tensor]:
        u, sigma, _ = torch.linalg.svd(self._m(), full_matrices=False)
        return sigma**2, u


def input_covariance_root(gram: InputGram, name: str = "a layer") -> torch.Tensor:
    """QΛ^½ from the centred input covariance C_x = QΛQᵀ (so C_x = root·rootᵀ), negative rounding clamped."""
    check_finite(name, stats=gram)
    mu = gram.x_sum / gram.n
    lam, q = torch.linalg.eigh((gram.xtx / gram.n).sub_(torch.outer(mu, mu)))
    return q * lam.clamp_min(0).sqrt()


def principal_directions(stats: OutputStats | GramOutputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors as columns) of the output covariance, largest first."""
    return stats.principal()


def rom_factors(weight: torch.Tensor, bias: torch.Tensor | None, stats: OutputStats | GramOutputStats,
                max_rank: int | None = None, name: str = "this Linear") -> Factors:
    """Factors of the layer from its output statistics: A = V_rᵀW, B = V_r, bias with mean compensation."""
    check_finite(name, weight, stats)
    w = weight.detach().double()
    d_out, d_in = w.shape
    values, vectors = principal_directions(stats)
    # Beyond min(d_in, d_out) the outputs (an affine image of d_in inputs) have no variance left to keep.
    k = min(d_in, d_out) if max_rank is None else min(max_rank, d_in, d_out)
    v = vectors[:, :k].contiguous()
    mu = stats.mean()
    b0 = bias.detach().double() if bias is not None else torch.zeros(d_out, dtype=torch.float64)
    return Factors(a=v.T @ w, b=v, bias=mu, bias_coef=v.T @ (b0 - mu), energy=values.clamp_min(0))
