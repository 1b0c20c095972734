"""Fake-quant forward time against full precision (side by side), and GPTQ over all of SmolLM2's Linears.

1. The same SmolLM2 forward on the same batch, FP and W4A4 (RTN weights, per-token dynamic activations),
   alternating arms each repeat; the ratio of medians is the cost of simulating quantization. Target ≤ 1.5×.
2. GPTQ W4 (per-channel, act-order) on all 210 block Linears, block by block, side by side in float64 (the
   numerics before gptq_precision existed) and float32 (the default), each in its own child process so its
   peak RSS (ru_maxrss) is its own, alternating which goes first when repeated. Target: float32 < 60 s on
   2 cores. How far float32 is from float64 on the same layers: the fraction of integer codes that differ,
   the relative difference of each layer's quantization error on its calibration activations
   (||X(W - Ŵ)^T||² / ||XW^T||² = tr(ΔW H ΔW^T) / tr(W H W^T), from the Hessian GPTQ was given; the time
   this bookkeeping takes is subtracted from the wall time), and wiki-test perplexity of both.

Usage: python bench/quant_speed.py [--batch 4] [--seq-len 128] [--repeats 5] [--gptq-samples 32]
       [--gptq-seq-len 512] [--gptq-repeats 1] [--ppl-tokens 4096] [--skip-gptq]. Writes
       bench/out/quant_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import s2d  # noqa: F401  (offline defaults)
from s2d.assets import calibration_batch, load_model, wiki_text
from s2d.quant import QuantConfig, quantize

GPTQ_CHILD = """
import json, resource, sys, time
import torch
import s2d.quant.gptq as gptq
from s2d.assets import calibration_batch, load_model, wiki_text
from s2d.eval import perplexity
from s2d.quant import QuantConfig, quantize, quantized_layers
from s2d.quant.primitives import dequantize_affine
samples, seq_len, precision, codes_path, ppl_tokens = sys.argv[1:6]
torch.set_num_threads(2)
model, tok = load_model("smollm2-135m")
calib = calibration_batch(tok, wiki_text("train"), int(samples), int(seq_len), seed=0)
errors, bookkeeping = [], [0.0]
quantize_weight = gptq.gptq_quantize_weight

def measured(weight, hessian, spec, *args, **kwargs):  # each layer's error on its calibration activations
    out = quantize_weight(weight, hessian, spec, *args, **kwargs)
    t = time.perf_counter()
    w = weight.detach().double()
    dw = w - dequantize_affine(*out, spec.block_size(w.shape), torch.float64)
    errors.append((((dw @ hessian) * dw).sum() / ((w @ hessian) * w).sum()).item())
    bookkeeping[0] += time.perf_counter() - t
    return out

gptq.gptq_quantize_weight = measured
t0, c0 = time.perf_counter(), time.process_time()
quantize(model, QuantConfig.from_scheme("W4A16", method="gptq", gptq_precision=precision), calib=calib,
         progress=False)
wall, cpu = time.perf_counter() - t0 - bookkeeping[0], time.process_time() - c0 - bookkeeping[0]
layers = quantized_layers(model)
torch.save({name: m.qweight for name, m in layers.items()}, codes_path)
ids = torch.tensor(tok(wiki_text("test")[: 8 * int(ppl_tokens)])["input_ids"][: int(ppl_tokens)])
ppl = perplexity(model, ids, seq_len=512, progress=False)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"precision": precision, "layers": len(layers), "wall_s": wall, "cpu_s": cpu,
                  "bookkeeping_s": bookkeeping[0], "peak_rss_mib": rss, "ppl": ppl.ppl, "ppl_tokens": ppl.n_tokens,
                  "layer_errors": dict(zip(layers, errors, strict=True))}))
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


def gptq_side_by_side(args) -> dict:
    """GPTQ over the whole model in float64 and float32, one child process per run; timings and agreement."""
    runs: dict[str, list[dict]] = {"float64": [], "float32": []}
    with tempfile.TemporaryDirectory() as tmp:
        codes = {p: str(Path(tmp) / f"{p}.pt") for p in runs}
        for r in range(args.gptq_repeats):
            for precision in (("float64", "float32") if r % 2 == 0 else ("float32", "float64")):
                done = subprocess.run([sys.executable, "-c", GPTQ_CHILD, str(args.gptq_samples),
                                       str(args.gptq_seq_len), precision, codes[precision], str(args.ppl_tokens)],
                                      capture_output=True, text=True, check=True)
                runs[precision].append(json.loads(done.stdout.strip().splitlines()[-1]))
        q64, q32 = torch.load(codes["float64"]), torch.load(codes["float32"])
    differ = sum(int((q64[n] != q32[n]).sum()) for n in q64)
    rows = sum(int((q64[n] != q32[n]).any(dim=1).sum()) for n in q64)
    total, total_rows = sum(q.numel() for q in q64.values()), sum(q.shape[0] for q in q64.values())
    e64, e32 = runs["float64"][-1]["layer_errors"], runs["float32"][-1]["layer_errors"]
    rel = {n: (e32[n] - e64[n]) / e64[n] for n in e64}
    wall = {p: statistics.median(r["wall_s"] for r in v) for p, v in runs.items()}
    g = {"samples": args.gptq_samples, "seq_len": args.gptq_seq_len, "repeats": args.gptq_repeats,
         "layers": runs["float32"][-1]["layers"], "runs": runs, "median_wall_s": wall,
         "ratio_float64_over_float32": wall["float64"] / wall["float32"],
         "codes_differ_fraction": differ / total, "rows_differ_fraction": rows / total_rows,
         "layer_error_rel_diff": rel, "layer_error_rel_diff_median": statistics.median(rel.values()),
         "layer_error_rel_diff_max_abs": max(abs(v) for v in rel.values()),
         "ppl": {p: v[-1]["ppl"] for p, v in runs.items()}, "ppl_tokens": runs["float32"][-1]["ppl_tokens"]}
    worst = max(rel, key=lambda n: abs(rel[n]))
    print(f"GPTQ W4 on {g['layers']} Linears with {args.gptq_samples}x{args.gptq_seq_len} calibration tokens "
          f"(median of {args.gptq_repeats}, each in its own process):")
    for p, v in runs.items():
        last = v[-1]
        print(f"  {p}: wall {wall[p]:.1f} s, cpu {last['cpu_s']:.1f} s, peak RSS {last['peak_rss_mib']:.0f} MiB, "
              f"wiki ppl {last['ppl']:.3f} ({last['ppl_tokens']} tokens)")
    print(f"  float32 wall {wall['float32']:.1f} s (target < 60 s); "
          f"float64 / float32 = {g['ratio_float64_over_float32']:.2f}x")
    print(f"  float32 vs float64: integer codes differ on {100 * g['codes_differ_fraction']:.3f}% of entries "
          f"({100 * g['rows_differ_fraction']:.2f}% of rows have any difference); each layer's calibration error "
          f"differs by median {100 * g['layer_error_rel_diff_median']:+.4f}%, at most {100 * rel[worst]:+.4f}% "
          f"({worst}); ppl {g['ppl']['float32']:.3f} vs {g['ppl']['float64']:.3f}")
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gptq-samples", type=int, default=32)
    parser.add_argument("--gptq-seq-len", type=int, default=512)
    parser.add_argument("--gptq-repeats", type=int, default=1, help="runs of each precision, alternating order")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="wiki test tokens each quantized model scores")
    parser.add_argument("--skip-gptq", action="store_true")
    parser.add_argument("--out", default="bench/out/quant_speed.json")
    args = parser.parse_args()
    result = {"forward": forward_ratio(args.batch, args.seq_len, args.repeats)}
    f = result["forward"]
    print(f"forward {args.batch}x{args.seq_len} tokens: FP {f['median_s']['fp']:.3f} s, W4A4 fake-quant "
          f"{f['median_s']['w4a4']:.3f} s (median of {args.repeats}); ratio {f['ratio']:.2f}x (target <= 1.5x)")
    if not args.skip_gptq:
        result["gptq"] = gptq_side_by_side(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
