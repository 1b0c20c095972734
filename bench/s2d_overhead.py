"""S2D's per-step overhead against plain AdamW on SmolLM2, measured side by side in one process.

Arms alternate step by step, and which arm goes first flips every step, so that machine noise and cache
effects hit both alike. The S2D
arm's steps between refreshes are timed directly; the refresh (top-K SVD of every targeted weight plus
PCDR on the captured inputs) is timed separately, and the amortized overhead at refresh interval m is

    (t_s2d_step + t_refresh / m) / t_plain_step − 1.

Usage: python bench/s2d_overhead.py [--steps 8] [--m 100] [--batch 2] [--seq-len 256] [--form coupled]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from s2d.assets import load_model
from s2d.commands.tasks import LMTask
from s2d.regularize import S2DConfig, SelectiveSpectralDecay


def one_step(model, optimizer, batch, reg) -> None:
    loss = model(**batch).loss
    if reg is not None:
        loss = loss + reg.penalty()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if reg is not None:
        reg.step(lr=lr)
    optimizer.zero_grad(set_to_none=True)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm")
    ap.add_argument("--m", type=int, default=100, help="refresh interval the overhead is amortized over")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--form", default="coupled", choices=["coupled", "decoupled"])
    ap.add_argument("--svd", default="subspace", choices=["subspace", "full"])
    ap.add_argument("--out", default="bench/out/s2d_overhead.json")
    args = ap.parse_args()
    torch.manual_seed(0)

    plain, tok = load_model("smollm2-135m")
    reg_model, _ = load_model("smollm2-135m")
    task = LMTask(tok, args.seq_len, seed=0, eval_samples=1)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=5e-5)
    opt_reg = torch.optim.AdamW(reg_model.parameters(), lr=5e-5)
    reg = SelectiveSpectralDecay(reg_model, S2DConfig(refresh_every=args.m, form=args.form, svd=args.svd),
                                 optimizer=opt_reg)
    plain.train()
    reg_model.train()

    # Step 0 of the S2D arm captures inputs and refreshes: time it as the refresh-bearing step.
    warm = task.batch(0, 0, args.batch)
    one_step(plain, opt_plain, warm, None)
    refresh_step = timed(lambda: one_step(reg_model, opt_reg, warm, reg))
    # The refresh alone, measured again on the inputs it captured, separately from any step.
    reg._refreshed_at = -1
    reg.steps = 0
    reg_model(**warm)  # a forward so the hooks hold real inputs
    refresh_only = timed(lambda: reg.refresh())
    reg.steps = 1
    times = {"plain": [], "s2d": []}
    for step in range(1, args.steps + 1):
        batch = task.batch(step, 0, args.batch)
        arms = [("plain", plain, opt_plain, None), ("s2d", reg_model, opt_reg, reg)]
        for name, model, opt, r in arms if step % 2 else arms[::-1]:
            times[name].append(timed(lambda m=model, o=opt, b=batch, r=r: one_step(m, o, b, r)))

    def med(arm, i):
        return float(torch.tensor([t[i] for t in times[arm]]).median())

    plain_wall, s2d_wall = med("plain", 0), med("s2d", 0)
    amortized = (s2d_wall + refresh_only[0] / args.m) / plain_wall - 1
    result = {
        "model": "smollm2-135m", "batch": args.batch, "seq_len": args.seq_len, "form": args.form, "svd": args.svd,
        "m": args.m, "timed_steps_per_arm": args.steps, "targets": len(reg.targets),
        "plain_step_s": {"wall": plain_wall, "process": med("plain", 1)},
        "s2d_step_s": {"wall": s2d_wall, "process": med("s2d", 1)},
        "refresh_s": {"wall": refresh_only[0], "process": refresh_only[1]},
        "first_step_with_cold_refresh_s": {"wall": refresh_step[0], "process": refresh_step[1]},
        "per_step_overhead": s2d_wall / plain_wall - 1,
        "amortized_overhead": amortized,
        "selected_layers": sum(1 for f in reg.factors.values() if f["k_target"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
