"""Weight space: truncated SVD, W ≈ U_r Σ_r V_rᵀ stored as A = Σ_r V_rᵀ and B = U_r (SPEC §4)."""

from __future__ import annotations

import torch

from s2d.lowrank.factorized import Factors, check_finite


def svd_factors(weight: torch.Tensor, bias: torch.Tensor | None = None, max_rank: int | None = None,
                name: str = "this Linear") -> Factors:
    """Factors of W (d_out×d_in) from its SVD in float64, largest singular values first."""
    check_finite(name, weight)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    k = len(s) if max_rank is None else min(max_rank, len(s))
    return Factors(a=s[:k, None] * vh[:k], b=u[:, :k].contiguous(),
                   bias=None if bias is None else bias.detach().double(), energy=s**2)
