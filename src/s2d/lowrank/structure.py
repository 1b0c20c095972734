"""Structure study (SFSD): how low-rank each Linear is, in weight space and in feature space.

The effective rank at energy e is the smallest k whose top-k spectrum holds a fraction e of the total:
singular values squared of W (weight space), eigenvalues of the centred output covariance on calibration
data (feature space). Reported by role and depth, as a fraction of min(d_in, d_out).

Usage: python -m s2d.lowrank.structure MODEL [--n-samples 256] [--seq-len 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from s2d.arch import describe
from s2d.lowrank.api import calibration, collect_factors
from s2d.lowrank.config import LowRankConfig

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


def structure_figure(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(dict.fromkeys(r["role"] for r in rows))
    fig, axes = plt.subplots(2, len(ENERGIES), figsize=(4 * len(ENERGIES), 6), sharex=True, sharey=True)
    for i, space in enumerate(("weight", "feature")):
        for j, e in enumerate(ENERGIES):
            ax = axes[i][j]
            for role in roles:
                sel = [r for r in rows if r["role"] == role]
                ax.plot([r["block"] for r in sel], [r[f"{space}_r{round(e * 100)}"] / min(r["d_in"], r["d_out"])
                                                    for r in sel], marker=".", ms=3, lw=1, label=role)
            ax.set_title(f"{space} space, {e:.0%} energy", fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("effective rank / min(d_in, d_out)")
            if i == 1:
                ax.set_xlabel("block")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def by_role(rows: list[dict]) -> list[tuple]:
    """Mean effective rank / min(d) per role, for the Markdown table."""
    out = []
    for role in dict.fromkeys(r["role"] for r in rows):
        sel = [r for r in rows if r["role"] == role]
        cells = [sum(r[f"{s}_r{round(e * 100)}"] / min(r["d_in"], r["d_out"]) for r in sel) / len(sel)
                 for s in ("weight", "feature") for e in ENERGIES]
        out.append((role, f"{sel[0]['d_out']}x{sel[0]['d_in']}", *[round(c, 3) for c in cells]))
    return out


def main(argv: list[str] | None = None) -> int:
    from s2d.assets import load_model
    from s2d.errors import S2DError
    from s2d.report import md_table
    from s2d.runs import RunFolder, default_run_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--n-samples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    try:
        config = LowRankConfig(method="rom", n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)
        out = args.out or default_run_dir("lowrank-structure")
        run = RunFolder(out, "lowrank-structure", {"model": args.model, **config.to_dict()}, seed=args.seed)
        model, tok = load_model(args.model)
        rows = structure_rows(model, calibration(tok, config), config.chunk_size)
    except S2DError as err:
        print(f"s2d: error: {err}", file=sys.stderr)
        return 2
    run.write_metrics({"model": args.model, "calibration": f"wiki train, {args.n_samples} x {args.seq_len} tokens",
                       "energies": list(ENERGIES), "linears": rows})
    structure_figure(rows, run.figure_path("structure.png"),
                     f"{args.model}: effective rank by role and depth ({args.n_samples}x{args.seq_len} wiki tokens)")
    headers = ["role", "shape (out x in)", *[f"{s} r{round(e * 100)}" for s in ("weight", "feature") for e in ENERGIES]]
    run.write_text("report.md", f"# Structure study of {args.model}\n\nCommand: `python -m s2d.lowrank.structure "
                   f"{' '.join(argv or sys.argv[1:])}`\n\nMean effective rank / min(d_in, d_out) by role:\n\n"
                   + md_table(headers, by_role(rows)) + "\n![structure](figures/structure.png)\n")
    print(md_table(headers, by_role(rows)))
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
