"""Fake-quant forward time against full precision (side by side), and GPTQ over all of SmolLM2's Linears.

1. The same SmolLM2 forward on the same batch, FP and W4A4 (RTN weights, per-token dynamic activations),
   alternating arms each repeat; the ratio of medians is the cost of simulating quantization. Target ≤ 1.5×.
2. GPTQ W4 (per-channel, act-order) on all 210 block Linears, block by block, in a child process so its peak
   RSS (ru_maxrss) is its own. Target: under 10 minutes on 2 cores.

Usage: python bench/quant_speed.py [--batch 4] [--seq-len 128] [--repeats 5] [--gptq-samples 32]
       [--gptq-seq-len 512] [--skip-gptq]. Writes bench/out/quant_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import s2d  # noqa: F401  (offline defaults)
from s2d.assets import calibration_batch, load_model, wiki_text
from s2d.quant import QuantConfig, quantize

GPTQ_CHILD = """
import json, resource, sys, time
from s2d.assets import calibration_batch, load_model, wiki_text
from s2d.quant import QuantConfig, quantize, quantized_layers
model, tok = load_model("smollm2-135m")
calib = calibration_batch(tok, wiki_text("train"), int(sys.argv[1]), int(sys.argv[2]), seed=0)
t0, c0 = time.perf_counter(), time.process_time()
quantize(model, QuantConfig.from_scheme("W4A16", method="gptq"), calib=calib, progress=False)
print(json.dumps({"layers": len(quantized_layers(model)), "wall_s": time.perf_counter() - t0,
                  "cpu_s": time.process_time() - c0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def forward_ratio(batch: int, seq_len: int, repeats: int) -> dict:
    model, tok = load_model("smollm2-135m")
    model.eval()
    quant = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A4"), progress=False)
    ids = calibration_batch(tok, wiki_text("validation"), batch, seq_len, seed=1)
    arms = {"fp": model, "w4a4": quant}
    times = {name: [] for name in arms}
    cpu = {name: [] for name in arms}
    with torch.no_grad():
        for m in arms.values():
            m(input_ids=ids, use_cache=False)  # warm-up
        for r in range(repeats):
            for name in (("fp", "w4a4") if r % 2 == 0 else ("w4a4", "fp")):
                t0, c0 = time.perf_counter(), time.process_time()
                arms[name](input_ids=ids, use_cache=False)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"batch": batch, "seq_len": seq_len, "repeats": repeats, "wall_s": times, "cpu_s": cpu,
            "median_s": med, "ratio": med["w4a4"] / med["fp"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gptq-samples", type=int, default=32)
    parser.add_argument("--gptq-seq-len", type=int, default=512)
    parser.add_argument("--skip-gptq", action="store_true")
    parser.add_argument("--out", default="bench/out/quant_speed.json")
    args = parser.parse_args()
    result = {"forward": forward_ratio(args.batch, args.seq_len, args.repeats)}
    f = result["forward"]
    print(f"forward {args.batch}x{args.seq_len} tokens: FP {f['median_s']['fp']:.3f} s, W4A4 fake-quant "
          f"{f['median_s']['w4a4']:.3f} s (median of {args.repeats}); ratio {f['ratio']:.2f}x (target <= 1.5x)")
    if not args.skip_gptq:
        done = subprocess.run([sys.executable, "-c", GPTQ_CHILD, str(args.gptq_samples), str(args.gptq_seq_len)],
                              capture_output=True, text=True, check=True)
        g = json.loads(done.stdout.strip().splitlines()[-1])
        g.update(samples=args.gptq_samples, seq_len=args.gptq_seq_len)
        result["gptq"] = g
        print(f"GPTQ W4 on {g['layers']} Linears with {args.gptq_samples}x{args.gptq_seq_len} calibration tokens: "
              f"wall {g['wall_s']:.1f} s ({g['wall_s'] / 60:.1f} min, target < 10 min), cpu {g['cpu_s']:.1f} s, "
              f"peak RSS {g['peak_rss_mib']:.0f} MiB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
