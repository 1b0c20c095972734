"""Mixed precision on SmolLM2: wiki perplexity against average bits, between a base scheme and a higher one.

For each average-bit budget, `s2d quantize smollm2-135m --scheme BASE --avg-bits B --high-scheme HIGH` measures
each Linear's sensitivity (the KL gain of raising it alone, one forward per Linear on 4×128 calibration tokens)
and raises the most sensitive Linears per parameter within the budget, on top of a recipe (default: `--recipe best`,
the strongest stack the W4A4 ladder found). Budget = BASE's bits
is the uniform base scheme and budget = HIGH's bits the uniform high one: the two ends of the curve.
Wiki-test ppl@128 on the first 16,384 tokens, as bench/w4a4_ladder.py.

Each budget is a run folder under --root (resumed or redone until its metrics.json exists); the table,
bench/out/mixed_precision.json and bench/out/mixed_precision.png are read back from those folders.

Usage: python bench/mixed_precision.py [--root runs/mixed-precision] [--budgets 4 4.5 5 6 8] [--base W4A4]
       [--high W4A8] [--recipe "--method gptq --rotate ..."] [--table]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from s2d.experiments.mixed_precision import finished, folder_name, table

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "mixed_precision.json"
FIGURE = OUT.with_suffix(".png")  # make_results copies it into docs/figures
RECIPE = "--recipe best"  # the strongest stack the W4A4 ladder found (s2d/quant/recipes/best.yaml)
BUDGETS = (4.0, 4.5, 5.0, 6.0, 8.0)


def command(budget: float, args: argparse.Namespace) -> list[str]:
    return ["s2d", "quantize", "smollm2-135m", "--scheme", args.base, "--avg-bits", f"{budget:g}", "--high-scheme",
            args.high, *shlex.split(args.recipe), "--eval", "ppl:wiki", "--ppl-tokens", "16384", "--no-model",
            "--resume", "--out", str(args.root / folder_name(budget))]


def run(cmd: list[str], log: Path) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] $ {' '.join(cmd)}", flush=True)
    exe = str(Path(sys.executable).with_name("s2d"))
    with log.open("a") as f:
        subprocess.run([exe, *cmd[1:]], check=True, stdout=f, stderr=subprocess.STDOUT)


def plot(cells: dict[str, dict], path: Path) -> None:
    """Perplexity against average activation bits (the side W4A4 → W4A8 changes), FP as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((c["average_bits"]["a"], c["ppl"]) for c in cells.values())
    first = next(iter(cells.values()))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(*zip(*points, strict=True), "o-", label=f"{first['cell']} → {first['high_scheme']} by sensitivity")
    ax.axhline(first["fp_ppl"], ls="--", c="grey", label=f"FP {first['fp_ppl']:.2f}")
    ax.set_xlabel("average activation bits (MAC-weighted)")
    ax.set_ylabel(f"{first['task']} perplexity")
    ax.set_title("SmolLM2-135M mixed precision")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/mixed-precision"))
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="average-bit budgets")
    ap.add_argument("--base", default="W4A4", help="the scheme every Linear starts at")
    ap.add_argument("--high", default="W4A8", help="the scheme the most sensitive Linears are raised to")
    ap.add_argument("--recipe", default=RECIPE, help="the other `s2d quantize` flags, as one string")
    ap.add_argument("--table", action="store_true", help="only read the finished budgets")
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--figure", type=Path, default=FIGURE)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not args.table:
        args.root.mkdir(parents=True, exist_ok=True)
        done = finished(args.root, args.budgets)
        for budget in args.budgets:
            if folder_name(budget) not in done:  # not finished: resume it
                run(command(budget, args), args.root / f"{folder_name(budget)}.log")
    print(table(args.root, args.budgets))
    cells = finished(args.root, args.budgets)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": "python bench/mixed_precision.py", "budgets": cells,
                                     "commands": {folder_name(b): " ".join(command(b, args)) for b in args.budgets}},
                                    indent=1))
    if cells:
        plot(cells, args.figure)


if __name__ == "__main__":
    main()
