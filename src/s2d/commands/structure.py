"""The structure study (SFSD) as a command: effective ranks by role and depth, into a run folder.

Usage: python -m s2d.commands.structure MODEL [--n-samples 256] [--seq-len 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from s2d.commands.load import load_model
from s2d.errors import S2DError
from s2d.lowrank.api import calibration
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.structure import ENERGIES, by_role, structure_rows
from s2d.report import md_table
from s2d.report.lowrank import structure_figure
from s2d.runs import RunFolder, default_run_dir


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the process's), run the study, print the table; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
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
        run = RunFolder(out, "lowrank-structure", {"model": args.model, **config.to_dict()}, seed=args.seed,
                        argv=argv)
        model, tok = load_model(args.model)
        rows = structure_rows(model, calibration(tok, config), config.chunk_size)
    except S2DError as err:
        print(f"s2d: error: {err}", file=sys.stderr)
        return 2
    run.write_metrics({"model": args.model, "calibration": f"wiki train, {args.n_samples} x {args.seq_len} tokens",
                       "energies": list(ENERGIES), "linears": rows})
    structure_figure(rows, ENERGIES, run.figure_path("structure.png"),
                     f"{args.model}: effective rank by role and depth ({args.n_samples}x{args.seq_len} wiki tokens)")
    headers = ["role", "shape (out x in)", *[f"{s} r{round(e * 100)}" for s in ("weight", "feature") for e in ENERGIES]]
    run.write_text("report.md", f"# Structure study of {args.model}\n\nCommand: `python -m s2d.commands.structure "
                   f"{' '.join(argv)}`\n\nMean effective rank / min(d_in, d_out) by role:\n\n"
                   + md_table(headers, by_role(rows)) + "\n![structure](figures/structure.png)\n")
    print(md_table(headers, by_role(rows)))
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
