"""Top-k singular triplets and PCDR: what S2D refreshes every m steps and what diagnose reports (below both)."""

from __future__ import annotations

import torch


def top_singular(weight: torch.Tensor, k: int, method: str = "subspace", iters: int = 4,
                 warm: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U d_out×k, S k, V d_in×k) of `weight`, in float64.

    "subspace" is block power iteration on WᵀW, warm-started from the previous refresh's V: the top
    components drift slowly during fine-tuning, so a few iterations suffice and no full SVD is needed.
    It is deterministic (seeded start), so resumed runs reproduce the same factors.
    """
    w = weight.detach().double()
    if method == "full" or min(w.shape) <= k + 8:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    width = min(min(w.shape), k + 8)  # oversampling makes the top-k converge much faster
    if warm is not None and warm.shape == (w.shape[1], width):
        basis = warm.double()
    else:
        gen = torch.Generator().manual_seed(seed)
        basis = torch.randn(w.shape[1], width, generator=gen, dtype=torch.float64)
    for _ in range(iters):
        basis, _ = torch.linalg.qr(w.T @ (w @ basis))
    u, s, vh = torch.linalg.svd(w @ basis, full_matrices=False)
    v = basis @ vh.T
    return u[:, :k], s[:k], v[:, :k]


def pcdr(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
         rows: str = "all") -> torch.Tensor:
    """PCDR_k for k = 1..K at each row's outlier neuron i* = argmax|y_i|, aggregated over rows.

    PCDR_k = |Σ_{r≤k} σ_r u_{i*r} v_rᵀx| / |y_{i*}|, with y = Wx the full (bias-free) activation.
    `rows="outliers"` averages only over the 1% of rows with the largest |y_{i*}| (at least one row).
    """
    x = x.detach().double().reshape(-1, x.shape[-1])
    y = x @ weight.detach().double().T
    peak, neuron = y.abs().max(dim=1)
    parts = (x @ v) * s * u[neuron]  # row j, component r: σ_r u_{i*_j r} (v_rᵀ x_j)
    ratio = parts.cumsum(dim=1).abs() / peak.clamp_min(1e-30).unsqueeze(1)
    if rows == "outliers":
        keep = max(1, int(0.01 * len(peak)))
        ratio = ratio[peak.topk(keep).indices]
    return ratio.mean(dim=0)
