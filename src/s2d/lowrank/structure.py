"""Structure study (SFSD): how low-rank each Linear is, in weight space and in feature space.

The effective rank at energy e is the smallest k whose top-k spectrum holds a fraction e of the total:
singular values squared of W (weight space), eigenvalues of the centred output covariance on calibration
data (feature space). Reported by role and depth, as a fraction of min(d_in, d_out).

Run it with: python -m s2d.commands.structure MODEL [--n-samples 256] [--seq-len 128] [--out DIR]
"""

from __future__ import annotations

import torch

from s2d.arch import describe
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.factors import collect_factors

ENERGIES = (0.9, 0.95, 0.99)


def effective_rank(energy: torch.Tensor, fraction: float) -> int:
    """Smallest k with sum(energy[:k]) ≥ fraction · sum(energy); `energy` sorted descending, ≥ 0."""
    cum = torch.cumsum(energy.double().clamp_min(0), 0)
    return int(torch.searchsorted(cum, fraction * cum[-1]).item()) + 1


def structure_rows(model, calib, chunk_size: int = 32, progress: bool = True) -> list[dict]:
    """One row per block Linear: role, block, shape and effective ranks in both spaces."""
    desc = describe(model)
    linears = desc.linears()
    features = collect_factors(desc, {lin.name: 1 for lin in linears},
                               LowRankConfig(method="rom", chunk_size=chunk_size), calib, progress)
    rows = []
    for lin in linears:
        sigma = torch.linalg.svdvals(lin.module.weight.detach().double())
        row = {"name": lin.name, "role": lin.role, "block": lin.block, "d_out": lin.shape[0], "d_in": lin.shape[1]}
        for space, energy in (("weight", sigma**2), ("feature", features[lin.name].energy)):
            for e in ENERGIES:
                row[f"{space}_r{round(e * 100)}"] = effective_rank(energy, e)
        rows.append(row)
    return rows


def by_role(rows: list[dict]) -> list[tuple]:
    """Mean effective rank / min(d) per role, for the Markdown table."""
    out = []
    for role in dict.fromkeys(r["role"] for r in rows):
        sel = [r for r in rows if r["role"] == role]
        cells = [sum(r[f"{s}_r{round(e * 100)}"] / min(r["d_in"], r["d_out"]) for r in sel) / len(sel)
                 for s in ("weight", "feature") for e in ENERGIES]
        out.append((role, f"{sel[0]['d_out']}x{sel[0]['d_in']}", *[round(c, 3) for c in cells]))
    return out
