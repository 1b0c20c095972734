"""Activation-aware (whitened) SVD, SVD-LLM style: the SVD of W·S, S the Cholesky factor of XᵀX.

Truncating W·S at rank r minimizes ‖(W − W_r)Xᵀ‖_F over rank-r W_r (Eckart–Young in the whitened space,
since ‖M Xᵀ‖² = ‖M S‖² when XᵀX = S Sᵀ), so its error on the calibration inputs is never above plain SVD's.
"""

from __future__ import annotations

import logging

import torch

from s2d.errors import S2DError
from s2d.lowrank.factorized import Factors, check_finite

log = logging.getLogger(__name__)


class InputGram:
    """Streaming XᵀX and row count of a Linear's inputs, in float64."""

    def __init__(self, d_in: int):
        self.xtx = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.x_sum = torch.zeros(d_in, dtype=torch.float64)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.xtx.addmm_(x.T, x)
        self.x_sum += x.sum(0)
        self.n += x.shape[0]

    @property
    def sums(self) -> tuple[torch.Tensor, ...]:
        return self.xtx, self.x_sum


def whitening(gram: InputGram, damp: float = 1e-4, tries: int = 8,
              name: str = "a layer") -> tuple[torch.Tensor, float]:
    """(S lower-triangular with S Sᵀ = XᵀX + λI, λ). λ starts at damp·mean(diag) and grows ×10 until Cholesky
    succeeds, so rank-deficient X (fewer rows than d_in, dead channels) still gets an invertible S."""
    if gram.n == 0:
        raise S2DError(f"asvd saw no calibration inputs for {name}; give calibration data")
    check_finite(name, stats=gram)
    xtx = gram.xtx
    scale = float(xtx.diagonal().mean()) or 1.0  # all-zero inputs: 0 would leave λ = 0, any λ > 0 works
    lam = damp * scale
    eye = torch.eye(len(xtx), dtype=xtx.dtype)
    for _ in range(tries):
        s, info = torch.linalg.cholesky_ex(xtx + lam * eye)
        if int(info) == 0:
            return s, lam
        lam = max(lam * 10, 1e-8 * scale)
    raise S2DError(f"the Gram matrix of {name}'s calibration inputs could not be whitened even with heavy "
                   "dampening; give more calibration samples or raise damp")


def asvd_factors(weight: torch.Tensor, bias: torch.Tensor | None, gram: InputGram, damp: float = 1e-4,
                 max_rank: int | None = None, name: str = "this Linear") -> Factors:
    """Factors of W from the SVD of W·S: A = Σ_r V_rᵀ S⁻¹ (r×d_in), B = U_r; the layer's bias is kept."""
    check_finite(name, weight)
    w = weight.detach().double()
    s, lam = whitening(gram, damp, name=name)
    if lam > damp * float(gram.xtx.diagonal().mean()) * 1.5:
        log.info("asvd: Cholesky needed dampening λ=%.3g (rank-deficient inputs)", lam)
    u, sigma, vh = torch.linalg.svd(w @ s, full_matrices=False)
    k = len(sigma) if max_rank is None else min(max_rank, len(sigma))
    # Vh·S⁻¹ by a triangular solve (X S = Vh), never an explicit inverse.
    vh_sinv = torch.linalg.solve_triangular(s, vh[:k], upper=False, left=False)
    return Factors(a=sigma[:k, None] * vh_sinv, b=u[:, :k].contiguous(),
                   bias=None if bias is None else bias.detach().double(), energy=sigma**2)
