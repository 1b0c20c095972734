"""The fast spectrum: all σ and the top-k singular vectors from one `eigh` of W's smaller Gram matrix, with a
rounding bound on every σ and a residual on every vector checked per matrix.

A dense SVD with vectors of a 576×1536 float64 matrix costs about 5× its Gram product plus `eigh`; diagnose
needs vectors only for the top k (PCDR), and all σ only for the condition number and the spectra figure.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float64).eps / 2  # unit roundoff u of float64
SIGMA_TOL = 1e-6  # accepted bound on the relative error of every reported σ (σ₁..σ_keep and σ_min)
RESIDUAL_TOL = 1e-10  # accepted ||G v − λ v|| / λ₁ of each top-k Gram eigenvector, i.e. ||Wᵀu − σv|| ≤ 1e-10 σ₁²/σ


def sigma_bound(lam: torch.Tensor, fro2: float, m: int, n: int) -> torch.Tensor:
    """Upper bound on |σ̂_i − σ_i| / σ̂_i for σ̂_i = sqrt(λ̂_i), the eigenvalues of the float64 Gram matrix.

    Forming G = WᵀW perturbs it by at most γ_m‖W‖_F² (in 2-norm), and eigh is backward stable to about
    n·u·‖G‖; by Weyl every λ̂_i is within δ = 2(m + n)·u·‖W‖_F² of σ_i² (factor 2 for the constants), so
    |σ̂_i − σ_i| ≤ δ / (σ̂_i + σ_i) ≤ δ / σ̂_i. The bound is worst-case: the actual error is far smaller.
    """
    delta = 2.0 * (m + n) * EPS * fro2
    return torch.where(lam > 0, delta / lam.clamp_min(1e-300), torch.full_like(lam, float("inf")))


def gram_spectrum(w: torch.Tensor, top_k: int) -> tuple[torch.Tensor, tuple] | None:
    """(all σ descending, (U, S, V) top-k factors) of the float64 `w`; None if a top-k vector fails its residual
    check (the caller then takes the dense SVD).

    Where the rounding bound of some σ exceeds SIGMA_TOL (a large condition number: SmolLM2's q and o
    projections reach 1e5, and the Gram matrix squares it), the σ come from a dense `svdvals` instead, about
    half a full SVD; the vectors still come from the Gram matrix, whose top is well resolved at any condition.
    """
    m, n = w.shape
    tall = m >= n
    g = w.T @ w if tall else w @ w.T  # the smaller side: min(m, n)² entries
    lam, vecs = torch.linalg.eigh(g)
    lam, vecs = lam.flip(0), vecs.flip(1)
    k = min(top_k, len(lam))
    x = vecs[:, :k]
    residual = torch.linalg.vector_norm(g @ x - x * lam[:k], dim=0)
    if float(residual.max()) > RESIDUAL_TOL * max(float(lam[0]), 1e-300):
        return None
    fro2 = float(w.square().sum())
    s = lam.sqrt() if bool((sigma_bound(lam, fro2, m, n) <= SIGMA_TOL).all()) else torch.linalg.svdvals(w)
    # x holds V (tall) or U (wide); the other side is W v / ||W v|| (resp. Wᵀu / ||Wᵀu||).
    other = w @ x if tall else w.T @ x
    other = other / torch.linalg.vector_norm(other, dim=0).clamp_min(1e-300)
    u, v = (other, x.clone()) if tall else (x.clone(), other)
    return s, (u, s[:k].clone(), v)
