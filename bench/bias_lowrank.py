"""The surgical-decomposition study's bias claim: SmolLM2 dense against low-rank compressed, on the bias tasks.

One run folder per cell under --root (s2d.experiments.bias_lowrank.CELLS): `dense` is `s2d eval smollm2-135m`;
the low-rank cells are `s2d compress smollm2-135m ... --eval` (svd, asvd and rom at keep 0.9 and 0.8, rom with the
surgical ppl search at 0.9); the quantized cells `s2d quantize` (W8A8 RTN; W4A4 --recipe best) into
quantize-<cell>/, whose saved model `s2d eval` then scores; the fine-tuned cells bench/exp_smollm2_s2d.py's
`adamw` and `s2d-decoupled-outliers` arms (its own `s2d finetune` command, under --exp-root, so a finished
fine-tune of that experiment is reused and this one is reused by it), whose model `s2d eval` scores. Each scores
ppl:wiki (first 16,384 wiki test tokens), stereoset, crows-pairs, bbq and wino on the first
--limit items of each (the same items in every cell). S2D_BIAS_ITEMS is set to the cell's folder so each bias task
also writes its per-item outcomes there (bias_items/<task>.json), which the paired bootstrap reads. A cell whose
folder is complete with the same --limit is skipped, so the script resumes after an interruption. At the end (or
with --table) it prints the levels, the paired differences from dense and the generated verdict
(s2d.experiments.bias_lowrank reads the folders).

Estimated cost at one thread, from measured parts (the SmolLM2 low-rank grid's compress wall times: svd and rom
0.9 / 0.8 about 3 min each, asvd about 10 min each, the ppl search at 0.9 35 min; `s2d quantize` W8A8 RTN about
1 min, W4A4 --recipe best (GPTQ, rotations, clip search) about 10 min; each fine-tune of 100 steps at 2×256 tokens
about 10-15 min; the bias suite at the default --limit 300 plus 16,384 ppl tokens is about 60k scored tokens,
4-5 min per cell at one uncontended thread with the shared-prefix scoring, more for the fake-quantized cells; an
estimate from token counts, not a timed run): 2.5-3 h for all 13 cells, the surgical search and the two fine-tunes
about an hour of it (`--skip rom+search-0.9 ft-adamw ft-s2d`: about 1.5-2 h).

Usage: python bench/bias_lowrank.py [--root runs/bias-lowrank] [--limit 300] [--only CELL ...] [--skip CELL ...]
       python bench/bias_lowrank.py --table
       python bench/bias_lowrank.py --smoke          # tiny:llama, --limit 20, 2 fine-tune steps,
                                                     # root runs/bias-lowrank-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import exp_smollm2_s2d  # bench/ is on sys.path when this script runs: the fine-tuning arms and their commands

from s2d.experiments import bias_lowrank as bl
from s2d.experiments.record import MissingSetting

MODEL = "smollm2-135m"
FT_STEPS, FT_LR, FT_SEED = 100, 5e-5, 0  # bench/exp_smollm2_s2d.py's defaults
QUANT_PPL_LIMIT = 8  # the quantize run's own evaluation is a check that it ran; `s2d eval` scores the saved model


def finetune_folder(arm: str, args) -> Path:
    """Where bench/exp_smollm2_s2d.py keeps this arm's fine-tune (its layout: <root>/<arm>-s<seed>/finetune)."""
    return args.exp_root / f"{arm}-s{args.ft_seed}" / "finetune"


def stages(name: str, root: Path, limit: int, model: str, args) -> list[tuple[Path, list[str]]]:
    """(folder, command) in order for one cell; a folder whose run finished is skipped."""
    cell_kind, cell_args = bl.CELLS[name]
    common = ["--ppl-tokens", str(bl.PPL_TOKENS), "--limit", str(limit), "--overwrite", "--out", str(root / name)]
    scored = ["--tasks", ",".join(bl.TASKS), *common]
    if cell_kind == "dense":
        return [(root / name, ["s2d", "eval", model, *scored])]
    if cell_kind == "lowrank":
        return [(root / name, ["s2d", "compress", model, *cell_args, "--eval", ",".join(bl.TASKS), "--no-model",
                               *common])]
    if cell_kind == "quant":
        q = root / f"quantize-{name}"
        return [(q, ["s2d", "quantize", model, *cell_args, "--eval", "ppl:wiki", "--ppl-tokens", str(bl.PPL_TOKENS),
                     "--limit", str(QUANT_PPL_LIMIT), "--resume", "--out", str(q)]),
                (root / name, ["s2d", "eval", str(q / "model"), *scored])]
    (arm,) = cell_args
    ft = finetune_folder(arm, args)
    ns = argparse.Namespace(model=model, steps=args.ft_steps, lr=FT_LR, seed=args.ft_seed, ppl_tokens=bl.PPL_TOKENS,
                            gptq=False)
    train = exp_smollm2_s2d.stages(arm, ns, ft.parent)["finetune"]  # the experiment's exact command
    return [(ft, train), (root / name, ["s2d", "eval", str(ft / "model"), *scored])]


def finished(folder: Path, limit: int, scored: bool) -> bool:
    """A scored cell: complete with this --limit. A quantize or fine-tune stage: its run finished and saved a
    model (an interrupted quantize writes metrics.json with "complete": false; an interrupted fine-tune none)."""
    if scored:
        return bl.complete(folder, limit)
    path = folder / "metrics.json"
    return path.is_file() and json.loads(path.read_text()).get("complete", True) and (folder / "model").is_dir()


def run_logged(cmd: list[str], log: Path, items: Path) -> int:
    """Run one stage with its full output in its own log; S2D_BIAS_ITEMS points the per-item files at its folder."""
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "S2D_BIAS_ITEMS": str(items)}).returncode
    print(f"  -> exit {code} after {time.perf_counter() - t0:.0f} s (output: {log})", flush=True)
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="default runs/bias-lowrank (runs/bias-lowrank-smoke with --smoke)")
    ap.add_argument("--limit", type=int,
                    help=f"items per task (default {bl.DEFAULT_LIMIT}; {bl.SMOKE_LIMIT} with --smoke)")
    ap.add_argument("--table", action="store_true", help="only print the tables and verdict of finished cells")
    ap.add_argument("--smoke", action="store_true", help=f"the whole pipeline on tiny:llama, --limit {bl.SMOKE_LIMIT}")
    ap.add_argument("--only", nargs="*", help="run only these cells")
    ap.add_argument("--skip", nargs="*", default=[], help="do not run these cells")
    ap.add_argument("--exp-root", type=Path, help="bench/exp_smollm2_s2d.py's root, where the fine-tunes live "
                    "(default runs/exp-smollm2; <root>/exp with --smoke)")
    ap.add_argument("--ft-steps", type=int, help=f"fine-tuning steps (default {FT_STEPS}; 2 with --smoke)")
    ap.add_argument("--ft-seed", type=int, default=FT_SEED)
    ap.add_argument("--figure", type=Path, help="also write the bias-against-perplexity figure here")
    args = ap.parse_args()
    model = "tiny:llama" if args.smoke else MODEL
    root = args.root or Path("runs/bias-lowrank-smoke" if args.smoke else "runs/bias-lowrank")
    limit = args.limit or (bl.SMOKE_LIMIT if args.smoke else bl.DEFAULT_LIMIT)
    args.exp_root = args.exp_root or (root / "exp" if args.smoke else Path("runs/exp-smollm2"))
    args.ft_steps = args.ft_steps or (2 if args.smoke else FT_STEPS)
    if not args.table:
        root.mkdir(parents=True, exist_ok=True)
        s2d = str(Path(sys.executable).with_name("s2d"))
        for name in bl.CELLS:
            if (args.only and name not in args.only) or name in args.skip:
                continue
            plan = stages(name, root, limit, model, args)
            for k, (folder, cmd) in enumerate(plan):
                last = k == len(plan) - 1
                if finished(folder, limit, last):
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
                code = run_logged([s2d, *cmd[1:]], root / f"{name}.log", folder)
                if not finished(folder, limit, last):
                    print(f"  !! {name} did not finish (exit {code}); see its log", flush=True)
                    break
                if code:  # s2d compress's printout of a bias result fails after the folder is written
                    print(f"  (exit {code} after the run folder was complete; the folder is used)", flush=True)
    try:
        print(bl.table(root))
        print("\n".join(f"- {line}" for line in bl.verdict(root)))
        if args.figure and bl.figure(root, args.figure):
            print(f"wrote {args.figure}")
    except MissingSetting as err:
        print(f"no comparison: {err}")


if __name__ == "__main__":
    main()
