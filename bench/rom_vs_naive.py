"""Time and peak memory of s2d's rom against a naive rom, side by side on SmolLM2.

Both arms compress the same Linears at the same ranks, through the same block runner, on the same
calibration batch. They differ only in the two things the original code does:
- naive: stores every output Y of a layer, concatenates it, forms the covariance, and takes a dense `eig`
  (general, complex) of it, then sorts the real parts;
- s2d:   streams ΣYᵀY, ΣY and n in float64 and takes `eigh` (symmetric), sorted descending.
The naive arm lives only in this script. Each arm runs in its own process, so peak RSS (ru_maxrss) is its
own; arms alternate (s2d, naive, naive, s2d, ...) so machine noise hits both alike.

Usage: python bench/rom_vs_naive.py [--keep 0.9] [--n-samples 128] [--seq-len 128] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out" / "rom_vs_naive.json"


def _storing_hook(store: list, stop: bool):
    from s2d.lowrank.runner import _Stop

    def hook(module, args, out):
        store.append(out.detach().clone())
        if stop:
            raise _Stop  # the same early stop as s2d's runner: nothing after the group is needed
    return hook


def naive_compress(model, config, calib) -> None:
    """rom as the original code does it: all outputs kept, `eig` on the covariance (this script only)."""
    from s2d.arch import describe
    from s2d.lowrank.api import plan_for
    from s2d.lowrank.factorized import FactorizedLinear
    from s2d.lowrank.runner import BlockRunner

    desc = describe(model)
    plan = plan_for(model, desc, config, None)
    runner = BlockRunner(desc, calib, config.chunk_size)
    last = max(lin.block for lin in desc.linears() if lin.name in plan.ranks)
    for i in range(last + 1):
        names = [lin.name for lin in desc.blocks[i].linears if lin.name in plan.ranks]
        for group in runner.groups(i, names) if names else []:
            outputs = {n: [] for n in group}
            hooks = {desc.module(n): _storing_hook(outputs[n], stop=n == group[-1]) for n in group}
            runner._run(i, range(len(runner.hidden)), hooks)
            for n in group:
                y = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs.pop(n)]).double()
                mu = y.mean(0)
                cov = (y - mu).T @ (y - mu) / len(y)
                values, vectors = torch.linalg.eig(cov)
                order = torch.argsort(values.real, descending=True)
                v = vectors.real[:, order[: plan.ranks[n]]]
                dense = desc.module(n)
                w = dense.weight.detach().double()
                b0 = dense.bias.detach().double() if dense.bias is not None else torch.zeros(w.shape[0]).double()
                model.set_submodule(n, FactorizedLinear.from_factors(v.T @ w, v, mu + v @ (v.T @ (b0 - mu))))
                del y, cov, values, vectors
        if i < last:
            runner.advance(i)


def arm(name: str, args) -> dict:
    """One arm in this process: load, calibrate, compress (timed), and a quality probe."""
    import psutil

    from s2d.assets import load_model
    from s2d.lowrank import LowRankConfig, compress
    from s2d.lowrank.api import calibration

    config = LowRankConfig(method="rom", keep=args.keep, n_samples=args.n_samples, seq_len=args.seq_len)
    model, tok = load_model("smollm2-135m")
    calib = calibration(tok, config)
    probe = calib[:2]
    base_rss = psutil.Process().memory_info().rss / 2**20
    wall, cpu = time.perf_counter(), time.process_time()
    if name == "s2d":
        compress(model, config, calib=calib, progress=False)
    else:
        naive_compress(model, config, calib)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    return {"arm": name, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024, "rss_before_mb": base_rss, "probe_logits": logits[:, -1, :64].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, default=0.9)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs (order flips every pair)")
    ap.add_argument("--arm", choices=["s2d", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args)))
        return
    runs = []
    for rep in range(args.repeats):
        for name in (("s2d", "naive") if rep % 2 == 0 else ("naive", "s2d")):
            cmd = [sys.executable, __file__, "--arm", name, "--keep", str(args.keep), "--n-samples",
                   str(args.n_samples), "--seq-len", str(args.seq_len)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs.append(json.loads(out))
            r = runs[-1]
            print(f"{name:<6} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MiB "
                  f"(before compressing {r['rss_before_mb']:.0f} MiB)", flush=True)
    by = {a: [r for r in runs if r["arm"] == a] for a in ("s2d", "naive")}
    med = {a: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb", "rss_before_mb")}
           for a, rs in by.items()}
    diff = (torch.tensor(by["s2d"][0]["probe_logits"]) - torch.tensor(by["naive"][0]["probe_logits"])).abs().max()
    result = {"config": {"model": "smollm2-135m", "keep": args.keep, "n_samples": args.n_samples,
                         "seq_len": args.seq_len, "repeats": args.repeats, "threads": torch.get_num_threads()},
              "median": med, "runs": [{k: v for k, v in r.items() if k != "probe_logits"} for r in runs],
              "time_ratio_naive_over_s2d": med["naive"]["wall_s"] / med["s2d"]["wall_s"],
              "cpu_ratio_naive_over_s2d": med["naive"]["cpu_s"] / med["s2d"]["cpu_s"],
              "peak_rss_ratio_naive_over_s2d": med["naive"]["peak_rss_mb"] / med["s2d"]["peak_rss_mb"],
              "peak_rss_growth_ratio": (med["naive"]["peak_rss_mb"] - med["naive"]["rss_before_mb"])
              / max(1.0, med["s2d"]["peak_rss_mb"] - med["s2d"]["rss_before_mb"]),
              "max_abs_probe_logit_diff": float(diff)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"naive / s2d: wall x{result['time_ratio_naive_over_s2d']:.2f}, "
          f"cpu x{result['cpu_ratio_naive_over_s2d']:.2f}, "
          f"peak RSS x{result['peak_rss_ratio_naive_over_s2d']:.2f} (growth above the loaded model "
          f"x{result['peak_rss_growth_ratio']:.2f}); max |probe logit diff| {result['max_abs_probe_logit_diff']:.2e}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
