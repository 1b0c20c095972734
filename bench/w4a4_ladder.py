"""The W4A4 ladder on SmolLM2: each rung adds one technique to the one before, measured by `s2d quantize`.

RTN → + rotation (R1 + online R4) → + activation clipping 0.9 → + GPTQ → + GPTQ's full symmetric grid →
+ asymmetric activations → + MSE weight clipping → + per-token activation groups of 64, and the clip searched
per Linear instead of fixed; then W4A8 and W6A6 with the MSE-clipping rung's recipe. Weights are per channel
throughout (the packaged weights sit on a 4-bit g32 grid, so weight groups of 32 would flatter every number).
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
BEST = RUNGS["rotate-clip-gptq-full-asym-wmse"][1]
RUNGS.update({"W4A8-best": ("W4A8", BEST), "W6A6-best": ("W6A6", BEST)})
# The field's rungs (Llama-3.2-1B, WikiText-2, KV16; SPEC §3), theirs, beside ours where one corresponds.
THEIRS = {"rtn": "RTN, clip, asym, no rotation: 26×", "rotate": "random Hadamard R1: 11×",
          "rotate-clip-gptq-full-asym": "QuaRot-style GPTQ act-order, A4 asym dynamic g32: 1.45×"}


def run(cmd: list[str], log: Path) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] $ {' '.join(cmd)}", flush=True)
    exe = str(Path(sys.executable).with_name("s2d"))
    with log.open("a") as f:
        subprocess.run([exe, *cmd[1:]], check=True, stdout=f, stderr=subprocess.STDOUT)


def command(name: str, root: Path) -> list[str]:
    scheme, flags = RUNGS[name]
    return ["s2d", "quantize", "smollm2-135m", "--scheme", scheme, *flags, "--eval", "ppl:wiki", "--ppl-tokens",
            "16384", "--no-model", "--resume", "--out", str(root / name)]


def cell(folder: Path) -> dict | None:
    """(FP, quantized) perplexity and the seconds of one finished rung, from its metrics.json."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    if not m.get("complete"):
        return None
    (key, entry), = [(k, v) for k, v in m["results"].items() if k != "FP"]
    fp = m["results"]["FP"]["eval"]["ppl:wiki@128"]
    q = entry["eval"]["ppl:wiki@128"]
    return {"cell": key, "config": entry["config"], "fp_ppl": fp["ppl"], "ppl": q["ppl"], "n_tokens": q["n_tokens"],
            "ratio": q["ppl"] / fp["ppl"], "quantize_seconds": entry["seconds"]}


def table(root: Path) -> tuple[str, dict]:
    rows, cells = [], {}
    for name in RUNGS:
        c = cell(root / name)
        if c is None:
            rows.append(f"| {name} | (not run) | | | |")
            continue
        cells[name] = c
        rows.append(f"| {name} | {c['cell']} | {c['ppl']:.2f} | {c['ratio']:.2f}× | {THEIRS.get(name, '')} |")
    fp = next(iter(cells.values()))["fp_ppl"] if cells else float("nan")
    head = [f"SmolLM2 wiki-test ppl@128, FP {fp:.2f}", "", "| rung | cell | ppl | × FP | the field (theirs) |",
            "|---|---|---|---|---|"]
    return "\n".join(head + rows), cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/w4a4-ladder"))
    ap.add_argument("--rungs", nargs="*", choices=list(RUNGS), help="run only these rungs")
    ap.add_argument("--table", action="store_true", help="only read the finished rungs")
    args = ap.parse_args()
    if not args.table:
        args.root.mkdir(parents=True, exist_ok=True)
        for name in args.rungs or RUNGS:
            if cell(args.root / name) is None:
                run(command(name, args.root), args.root / f"{name}.log")
    text, cells = table(args.root)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "python bench/w4a4_ladder.py", "rungs": cells,
                               "commands": {n: " ".join(command(n, args.root)) for n in RUNGS}}, indent=1))


if __name__ == "__main__":
    main()
