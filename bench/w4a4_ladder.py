"""The W4A4 ladder on SmolLM2: each rung adds one technique to the one before, measured by `s2d quantize`.

RTN → + rotation (R1 + online R4) → + activation clipping 0.9 → + GPTQ → + GPTQ's full symmetric grid →
+ asymmetric activations → + MSE weight clipping → + per-token activation groups of 64, and the clip searched
per Linear instead of fixed, and R2 (alone, then with activation groups of 64 and 32); then W4A8 and W6A6
with the MSE-clipping rung's recipe. Weights are per channel throughout (the packaged weights sit on a 4-bit
g32 grid, so weight groups of 32 would flatter every number; activation groups do not).
Wiki-test ppl@128 on the first 16,384 tokens (16,256 scored), calibration 32×512 wiki-train tokens: the
issue's setting.

Each rung is a run folder under --root (resumed or redone until its metrics.json exists); the table and
bench/out/w4a4_ladder.json are read back from those folders.

Usage: python bench/w4a4_ladder.py [--root runs/w4a4-ladder] [--rungs NAME ...] [--table]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from s2d.experiments.ladder import cell, finished, table

OUT = Path(__file__).resolve().parent / "out" / "w4a4_ladder.json"
# rung -> (scheme, quantize flags); each adds one thing to the rung above it
CLIP, GRID, ASYM, WMSE = ["--option", "a_clip=0.9"], ["--option", "grid=full"], ["--option", "a_symmetric=false"], \
    ["--option", "w_observer=mse"]
RUNGS = {
    "rtn": ("W4A4", ["--method", "rtn"]),
    "rotate": ("W4A4", ["--method", "rtn", "--rotate"]),
    "rotate-clip": ("W4A4", ["--method", "rtn", "--rotate", *CLIP]),
    "rotate-clip-gptq": ("W4A4", ["--method", "gptq", "--rotate", *CLIP]),
    "rotate-clip-gptq-full": ("W4A4", ["--method", "gptq", "--rotate", *CLIP, *GRID]),
    "rotate-clip-gptq-full-asym": ("W4A4", ["--method", "gptq", "--rotate", *CLIP, *GRID, *ASYM]),
    "rotate-clip-gptq-full-asym-wmse": ("W4A4", ["--method", "gptq", "--rotate", *CLIP, *GRID, *ASYM, *WMSE]),
    "rotate-clip-gptq-full-asym-wmse-ag64": ("W4A4", ["--method", "gptq", "--rotate", *CLIP, *GRID, *ASYM, *WMSE,
                                                      "--option", "a_granularity=per_group",
                                                      "--option", "a_group_size=64"]),
}
# The clip ratio searched per Linear (by output error on 4 calibration sequences) instead of a fixed 0.9.
RUNGS["rotate-clipsearch-gptq-full-asym-wmse"] = ("W4A4", ["--method", "gptq", "--rotate", "--option",
                                                           "a_clip_search=true", *GRID, *ASYM, *WMSE])
# SpinQuant's R2 (each head's values and o_proj input turned by one head_dim Hadamard, folded into the weights).
RUNGS["rotate-r2-clip-gptq-full-asym-wmse"] = ("W4A4", [*RUNGS["rotate-clip-gptq-full-asym-wmse"][1], "--option",
                                                        "rotate_heads=true"])
R2_AG = [*RUNGS["rotate-r2-clip-gptq-full-asym-wmse"][1], "--option", "a_granularity=per_group"]
RUNGS["rotate-r2-clip-gptq-full-asym-wmse-ag64"] = ("W4A4", [*R2_AG, "--option", "a_group_size=64"])
RUNGS["rotate-r2-clip-gptq-full-asym-wmse-ag32"] = ("W4A4", [*R2_AG, "--option", "a_group_size=32"])
# Everything at once: R2, the clip searched per Linear, activation groups of 32.
RUNGS["all-r2-clipsearch-ag32"] = ("W4A4", ["--method", "gptq", "--rotate", "--option", "rotate_heads=true",
                                            "--option", "a_clip_search=true", *GRID, *ASYM, *WMSE, "--option",
                                            "a_granularity=per_group", "--option", "a_group_size=32"])
BEST = RUNGS["rotate-clip-gptq-full-asym-wmse"][1]
RUNGS.update({"W4A8-best": ("W4A8", BEST), "W6A6-best": ("W6A6", BEST),
              "W4A8-all": ("W4A8", RUNGS["all-r2-clipsearch-ag32"][1]),
              "W6A6-all": ("W6A6", RUNGS["all-r2-clipsearch-ag32"][1])})
# The named recipes (s2d/quant/recipes/*.yaml), learned rotations, the KV cache at 4 bits (mixed precision has its
# own sweep: bench/mixed_precision.py).
RUNGS.update({
    "recipe-best": ("W4A4", ["--recipe", "best"]),
    "best-learned": ("W4A4", ["--recipe", "best", "--option", "learn_rotation_steps=100"]),
    "recipe-best-kv4": ("W4A4KV4", ["--recipe", "best"]),
    "recipe-quarot": ("W4A4", ["--recipe", "quarot"]),
    "recipe-quarot-kv4": ("W4A4KV4", ["--recipe", "quarot"]),
    "recipe-spinquant": ("W4A4", ["--recipe", "spinquant"]),
    "W4A8-recipe-best": ("W4A8", ["--recipe", "best"]),
    "W6A6-recipe-best": ("W6A6", ["--recipe", "best"]),
})


def run(cmd: list[str], log: Path) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] $ {' '.join(cmd)}", flush=True)
    exe = str(Path(sys.executable).with_name("s2d"))
    with log.open("a") as f:
        subprocess.run([exe, *cmd[1:]], check=True, stdout=f, stderr=subprocess.STDOUT)


def command(name: str, root: Path) -> list[str]:
    scheme, flags = RUNGS[name]
    return ["s2d", "quantize", "smollm2-135m", "--scheme", scheme, *flags, "--eval", "ppl:wiki", "--ppl-tokens",
            "16384", "--no-model", "--resume", "--out", str(root / name)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/w4a4-ladder"))
    ap.add_argument("--rungs", nargs="*", choices=list(RUNGS), help="run only these rungs")
    ap.add_argument("--table", action="store_true", help="only read the finished rungs")
    args = ap.parse_args()
    if not args.table:
        args.root.mkdir(parents=True, exist_ok=True)
        for name in args.rungs or RUNGS:
            if cell(args.root / name) is None:  # not finished: resume it
                run(command(name, args.root), args.root / f"{name}.log")
    print(table(args.root, RUNGS))
    cells = finished(args.root, RUNGS)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "python bench/w4a4_ladder.py", "rungs": cells,
                               "commands": {n: " ".join(command(n, args.root)) for n in RUNGS}}, indent=1))


if __name__ == "__main__":
    main()
