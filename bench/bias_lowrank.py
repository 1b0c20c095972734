"""The surgical-decomposition study's bias claim: SmolLM2 dense against low-rank compressed, on the bias tasks.

One run folder per cell under --root: `dense` is `s2d eval smollm2-135m`, every other cell one
`s2d compress smollm2-135m ... --eval` (rom at keep 0.9 and 0.8, asvd at 0.9, rom with the surgical ppl search at
0.9), each scoring ppl:wiki (first 16,384 wiki test tokens), stereoset, crows-pairs, bbq and wino on the first
--limit items of each (the same items in every cell). S2D_BIAS_ITEMS is set to the cell's folder so each bias task
also writes its per-item outcomes there (bias_items/<task>.json), which the paired bootstrap reads. A cell whose
folder is complete with the same --limit is skipped, so the script resumes after an interruption. At the end (or
with --table) it prints the levels, the paired differences from dense and the generated verdict
(s2d.experiments.bias_lowrank reads the folders).

Estimated cost on 2 cores, from measured parts (the SmolLM2 low-rank grid's compress wall times: rom 0.9 and
0.8 about 3 min each, asvd 0.9 about 10 min, the ppl search at 0.9 35 min at one thread; the bias suite at --limit
200 took 82 s StereoSet, 76 s CrowS-Pairs, 143 s BBQ at one contended thread, WinoBias is CrowS-sized): 6-10 min of
evaluation per cell at the default --limit 300, so 1 h 10 min to 1 h 40 min in all, a third to a half of it the
surgical search (`--skip rom+search-0.9`: 45 min to 1 h).

Usage: python bench/bias_lowrank.py [--root runs/bias-lowrank] [--limit 300] [--only CELL ...] [--skip CELL ...]
       python bench/bias_lowrank.py --table
       python bench/bias_lowrank.py --smoke          # tiny:llama, --limit 20, root runs/bias-lowrank-smoke
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from s2d.experiments.bias_lowrank import DEFAULT_LIMIT, PPL_TOKENS, SMOKE_LIMIT, TASKS, cells, complete, table, verdict
from s2d.experiments.record import MissingSetting

MODEL = "smollm2-135m"


def command(name: str, args: list[str], root: Path, limit: int, model: str) -> list[str]:
    common = ["--ppl-tokens", str(PPL_TOKENS), "--limit", str(limit), "--overwrite", "--out", str(root / name)]
    if name == "dense":
        return ["s2d", "eval", model, "--tasks", ",".join(TASKS), *common]
    return ["s2d", "compress", model, *args, "--eval", ",".join(TASKS), "--no-model", *common]


def run_logged(cmd: list[str], log: Path, items: Path) -> int:
    """Run one cell with its full output in its own log; S2D_BIAS_ITEMS points the per-item files at its folder."""
    t0 = time.perf_counter()
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "S2D_BIAS_ITEMS": str(items)}).returncode
    print(f"  -> exit {code} after {time.perf_counter() - t0:.0f} s (output: {log})", flush=True)
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="default runs/bias-lowrank (runs/bias-lowrank-smoke with --smoke)")
    ap.add_argument("--limit", type=int, help=f"items per task (default {DEFAULT_LIMIT}; {SMOKE_LIMIT} with --smoke)")
    ap.add_argument("--table", action="store_true", help="only print the tables and verdict of finished cells")
    ap.add_argument("--smoke", action="store_true", help=f"the whole pipeline on tiny:llama, --limit {SMOKE_LIMIT}")
    ap.add_argument("--only", nargs="*", help="run only these cells")
    ap.add_argument("--skip", nargs="*", default=[], help="do not run these cells")
    args = ap.parse_args()
    model = "tiny:llama" if args.smoke else MODEL
    root = args.root or Path("runs/bias-lowrank-smoke" if args.smoke else "runs/bias-lowrank")
    limit = args.limit or (SMOKE_LIMIT if args.smoke else DEFAULT_LIMIT)
    if not args.table:
        root.mkdir(parents=True, exist_ok=True)
        s2d = str(Path(sys.executable).with_name("s2d"))
        for name, cell_args in cells().items():
            if (args.only and name not in args.only) or name in args.skip or complete(root / name, limit):
                continue
            cmd = command(name, cell_args, root, limit, model)
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
            code = run_logged([s2d, *cmd[1:]], root / f"{name}.log", root / name)
            if not complete(root / name, limit):
                print(f"  !! {name} did not finish (exit {code}); see its log", flush=True)
            elif code:  # s2d compress's printout of a bias result fails after the folder is written
                print(f"  (exit {code} after the run folder was complete; the folder is used)", flush=True)
    try:
        print(table(root))
        print("\n".join(f"- {line}" for line in verdict(root)))
    except MissingSetting as err:
        print(f"no comparison: {err}")


if __name__ == "__main__":
    main()
