"""SmolLM2 low-rank grid: dense, svd, asvd, rom and rom + surgical search at 90/80/70% of the parameters.

Each cell is one `s2d compress` command with its own run folder under --root; a cell whose metrics.json
exists is skipped, so the script resumes after an interruption. At the end (or with --table) it prints the
Markdown table of wiki test perplexity and zero-shot accuracy read from the cells' metrics.json
(s2d.experiments.lowrank_grid reads the cells).

The 80% cells keep their model, and `--quant` then runs `s2d quantize --sweep` (W6A6 / W4A4 with RTN,
GPTQ and rotation + GPTQ) on each of them: does a low-rank model quantize better or worse than the dense one?

Usage: python bench/lowrank_grid.py [--root runs/lowrank-grid] [--table] [--only CELL ...] [--limit 500] [--quant]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from s2d.experiments.lowrank_grid import QUANT_CELLS, QUANT_METHODS, QUANTIZED, cells, quant_table, table

TASKS = "ppl:wiki,analogy-mc,polarity,wiki-cloze"  # perplexity on the first 16,384 wiki test tokens


def command(name: str, args: list[str], root: Path, limit: int) -> list[str]:
    keep = [] if name in QUANTIZED else ["--no-model"]
    return ["s2d", "compress", "smollm2-135m", *args, "--eval", TASKS, "--ppl-tokens", "16384", "--limit",
            str(limit), *keep, "--overwrite", "--out", str(root / name)]


def quant_command(name: str, root: Path) -> list[str]:
    return ["s2d", "quantize", str(root / name / "model"), "--sweep", "--schemes", "W6A6,W4A4", "--methods",
            ",".join(QUANT_METHODS), "--eval", "ppl:wiki", "--ppl-tokens", "16384", "--resume", "--out",
            str(root / f"{name}-quant")]


def quant_done(folder: Path) -> bool:
    """Whether the sweep in folder measured every cell (an interrupted sweep leaves a partial metrics.json)."""
    path = folder / "metrics.json"
    return path.is_file() and set(QUANT_CELLS) <= set(json.loads(path.read_text())["results"])


def run_logged(cmd: list[str], log: Path) -> None:
    """Run one cell with its full output (progress bars included) in its own log, so a long cell shows progress."""
    t0 = time.perf_counter()
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"  -> exit {code} after {time.perf_counter() - t0:.0f} s (output: {log})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/lowrank-grid"))
    ap.add_argument("--table", action="store_true", help="only print the table of finished cells")
    ap.add_argument("--only", nargs="*", help="run only these cells")
    ap.add_argument("--limit", type=int, default=500, help="at most N examples per zero-shot task (default 500)")
    ap.add_argument("--quant", action="store_true", help="then quantize the kept 80%% models and the dense one")
    args = ap.parse_args()
    if not args.table:
        args.root.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no run folders yet
        s2d = str(Path(sys.executable).with_name("s2d"))
        for name, cell_args in cells().items():
            if (args.only and name not in args.only) or (args.root / name / "metrics.json").is_file():
                continue
            cmd = command(name, cell_args, args.root, args.limit)
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
            run_logged([s2d, *cmd[1:]], args.root / f"{name}.log")
        for name in QUANTIZED if args.quant else ():
            if (args.root / name / "model").is_dir() and not quant_done(args.root / f"{name}-quant"):
                cmd = quant_command(name, args.root)  # an interrupted sweep resumes cell by cell
                print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
                run_logged([s2d, *cmd[1:]], args.root / f"{name}-quant.log")
    print(table(args.root))
    print(quant_table(args.root))


if __name__ == "__main__":
    main()
