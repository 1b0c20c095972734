"""How long the whole bias suite takes on SmolLM2: every item of StereoSet, CrowS-Pairs, BBQ and WinoBias.

Scores each task once with s2d.eval.bias.evaluate_bias_task (the shared-prefix path `s2d eval` uses) and prints
wall and CPU seconds per task and in total against the 10-minute target; CPU seconds are printed too because on
a busy machine wall time measures the neighbours as well. With --limit N only the first N items of each task run
and the full-suite time is extrapolated by items (printed as such). --compare also scores the same items the
plain way (every option its own sequence) and reports the speed-up and the largest log-likelihood difference.

Usage: python bench/bias_speed.py [--model smollm2-135m] [--limit N] [--compare] [--out bench/out/bias_speed.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from s2d.assets import load_model
from s2d.eval.bias import BIAS_TASKS, build_bias_task, evaluate_bias_task
from s2d.io import atomic_write_json

TARGET_S = 600


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, help="first N items of each task, the full suite extrapolated by items")
    ap.add_argument("--compare", action="store_true", help="also time the plain path on the same items")
    ap.add_argument("--out", type=Path, default=Path("bench/out/bias_speed.json"))
    args = ap.parse_args()
    model, tok = load_model(args.model)
    model.eval()
    rows = {}
    for name in BIAS_TASKS:
        n_all = len(build_bias_task(name))
        (m, lls), wall, cpu = timed(lambda name=name: evaluate_bias_task(model, tok, name, limit=args.limit))
        scale = n_all / m["n"]  # 1 without --limit
        row = {"items": m["n"], "items_in_task": n_all, "scoring": m["scoring"], "wall_s": round(wall, 1),
               "cpu_s": round(cpu, 1), "full_wall_s": round(wall * scale, 1), "full_cpu_s": round(cpu * scale, 1)}
        if args.compare:
            (_, plain), pwall, pcpu = timed(lambda name=name: evaluate_bias_task(model, tok, name, limit=args.limit,
                                                                                  share=False))
            row.update(plain_wall_s=round(pwall, 1), plain_cpu_s=round(pcpu, 1), speedup_cpu=round(pcpu / cpu, 2),
                       max_abs_ll_diff=float(np.max(np.abs(np.subtract(lls, plain)))))
        rows[name] = row
        print(f"{name:12s} {m['n']:5d}/{n_all} items  {wall:7.1f} s wall  {cpu:7.1f} s CPU"
              + (f"  (full task: {row['full_wall_s']:.0f} s wall, {row['full_cpu_s']:.0f} s CPU)" if scale > 1 else "")
              + (f"  plain {row['plain_cpu_s']:.1f} s CPU, ×{row['speedup_cpu']:.2f}, max |Δll| "
                 f"{row['max_abs_ll_diff']:.1e}" if args.compare else ""), flush=True)
    total_wall = sum(r["full_wall_s"] for r in rows.values())
    total_cpu = sum(r["full_cpu_s"] for r in rows.values())
    what = "extrapolated from --limit by items" if args.limit else "measured"
    verdict = "within" if total_wall <= TARGET_S else "over"
    print(f"whole suite ({what}): {total_wall:.0f} s wall, {total_cpu:.0f} s CPU at {torch.get_num_threads()} "
          f"thread(s); target {TARGET_S} s: {verdict} it on wall time")
    atomic_write_json(args.out, {"model": args.model, "threads": torch.get_num_threads(), "limit": args.limit,
                                 "tasks": rows, "total_wall_s": round(total_wall, 1),
                                 "total_cpu_s": round(total_cpu, 1), "target_s": TARGET_S, "basis": what,
                                 "within_target": total_wall <= TARGET_S})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
