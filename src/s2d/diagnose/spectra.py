"""Weight spectra in float64, and PCDR accumulated over the calibration pass at each token's outlier neuron."""

from __future__ import annotations

import torch

from s2d.diagnose.gram import gram_spectrum
from s2d.errors import S2DError
from s2d.spectral import pcdr


def weight_spectrum(weight: torch.Tensor, top_k: int, keep: int, name: str = "this Linear",
                    method: str = "fast") -> tuple[dict, tuple]:
    """Summary of W's singular values, and its top-k factors (U, S, V) for PCDR, in float64.

    "exact" is one dense SVD. "fast" (the default) takes the σ and the top-k vectors from one `eigh` of the
    smaller Gram matrix (s2d.diagnose.gram): σ from a dense `svdvals` instead where their rounding bound exceeds
    a relative 1e-6, and the dense SVD where a vector's residual ||Wᵀu − σv|| exceeds 1e-10 σ₁²/σ; so the
    result equals the exact one to those tolerances. ||W||_F² (stable rank, energy) is summed from W itself.
    """
    w = weight.detach().double()
    if not torch.isfinite(w).all():
        raise S2DError(f"the weight of {name} contains NaN or Inf; the checkpoint is corrupt or training diverged")
    fast = gram_spectrum(w, top_k) if method == "fast" else None
    if fast is not None:
        s, factors = fast
        total = float(w.square().sum())  # ||W||_F², exact without any σ
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        # clone: slices would keep the full U and V of all 210 Linears alive (about 1.8 GB on SmolLM2)
        factors = (u[:, :top_k].clone(), s[:top_k].clone(), vh[:top_k].T.clone())
        total = float(s.square().sum())
    energy = s.square()
    s1 = float(s[0])
    summary = {
        "sigma": s[:keep].tolist(),
        "sigma1": s1,
        "stable_rank": total / (s1 * s1) if s1 > 0 else float("nan"),
        "condition": s1 / float(s[-1]) if float(s[-1]) > 0 else float("inf"),
        "energy_top": [float(energy[:k].sum()) / total if total > 0 else float("nan") for k in range(1, top_k + 1)],
        "spectrum_method": "fast" if fast is not None else "exact",  # "exact" also marks a fallback
    }
    return summary, factors


class PCDRAccumulator:
    """Mean PCDR_k over sampled rows, plus PCDR_k at the single row with the largest output |y| seen.

    Rows are sampled evenly within each batch so that at most `budget` rows are used over the whole pass.
    """

    def __init__(self, weight: torch.Tensor, factors: tuple, budget: int, rows_per_batch: int):
        self.weight, self.factors = weight, factors
        self.budget, self.rows_per_batch = budget, rows_per_batch
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self.peak = -1.0
        self.at_peak: list[float] = []

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        take = min(self.rows_per_batch, self.budget - self.rows, len(x))
        if take > 0:
            idx = torch.linspace(0, len(x) - 1, take).round().long()
            ratios = pcdr(x[idx], self.weight, *self.factors) * take
            self.sum = ratios if self.sum is None else self.sum + ratios
            self.rows += take
        peaks = y.detach().reshape(-1, y.shape[-1]).abs().amax(dim=1)
        row = int(peaks.argmax())
        if float(peaks[row]) > self.peak:
            self.peak = float(peaks[row])
            self.at_peak = pcdr(x[row : row + 1], self.weight, *self.factors).tolist()

    def finish(self) -> dict:
        mean = (self.sum / self.rows).tolist() if self.rows else []
        return {"pcdr": mean, "pcdr_rows": self.rows, "pcdr_at_peak": self.at_peak}
