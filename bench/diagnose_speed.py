"""`s2d diagnose` at the defaults, the exact path (dense SVDs) and the fast one side by side in one process.

Both arms see the same calibration batches (built once); each arm is the collection pass, the link study, the
severity and the reading, as `s2d.diagnose.diagnose` runs them. The exact arm is the old path in full: dense
SVDs (`spectra="exact"`) and the old statistics pass (`legacy_summarize`, kept here for the comparison).
Printed: wall time of each (spectra and total), their ratio, and the largest relative difference of every
reported number by kind (σ₁, the kept σ, stable rank, condition, energy, PCDR, max|x|, kurtosis, median,
severity, ...). Targets (issue 22): SmolLM2 < 40 s and a 0.5B model < 3 min on 2 cores, with the same
numbers (fast promises a relative 1e-6 on every σ).

No 0.5B checkpoint exists on this machine (ASSETS.md), so `--shape qwen2-0.5b` builds a seeded random model
with Qwen2.5-0.5B's exact configuration (24 blocks, d=896, MLP 4864, 14/2 heads, tied 151,936-token vocabulary)
and feeds it SmolLM2's tokenized calibration text (its ids all fall inside the larger vocabulary). The work,
the shapes and the FLOPs are those of the real model; the statistics are not (random weights have no massive
activations), so only its times and its fast-vs-exact differences mean anything.

Usage: OMP_NUM_THREADS=1 python bench/diagnose_speed.py [--model smollm2-135m | --shape qwen2-0.5b]
[--order exact,fast]. Writes bench/out/diagnose_speed/<model>-<threads>t.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import s2d  # noqa: F401  (offline defaults)
from s2d.assets import load_model
from s2d.diagnose import DiagnoseConfig, calibration_inputs, collect, link_study, reading, severity, stats

OUT_DIR = Path(__file__).parent / "out" / "diagnose_speed"
# Qwen2.5-0.5B's config.json, the fields that set the work
SHAPES = {"qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                             rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)}
# the module, not the function: s2d.diagnose re-exports collect(), which shadows the submodule's attribute
collect_module = sys.modules["s2d.diagnose.collect"]


def legacy_summarize(x, threshold, massive_abs, keep, sample0):
    """The statistics pass before issue 22 (float64 row sums, torch.histc, separate max and massive passes), so
    that the exact arm is the old path in full and the difference covers the faster statistics too."""
    x = x.detach()
    d = x.shape[-1]
    x3 = x.reshape(x.shape[0], -1, d) if x.dim() >= 3 else x.reshape(1, -1, d)
    rows = x3.reshape(-1, d).float()
    mean = rows.sum(dim=1, dtype=torch.float64).sum() / rows.numel()
    c = rows - mean.float()
    c2 = c * c
    absx = x3.abs()
    hist = torch.histc(absx.float().clamp_min(1e-30).log10().clamp(stats._LO, stats._HI - 1e-6), bins=stats._BINS,
                       min=stats._LO, max=stats._HI)
    massive = []
    big = (absx > massive_abs).nonzero()
    if len(big):
        values = absx[big[:, 0], big[:, 1], big[:, 2]].float()
        top = values.topk(min(keep, len(values))).indices
        massive = [(float(values[i]), sample0 + int(big[i, 0]), int(big[i, 1]), int(big[i, 2])) for i in top]

    def sum64(t):
        return float(t.sum(dim=1, dtype=torch.float64).sum())

    return stats.BatchSummary(
        n=rows.numel(), mean=float(mean), m2=sum64(c2), m3=sum64(c2 * c), m4=sum64(c2 * c2),
        max_abs=float(absx.max()), over=int((absx > threshold).sum()), big=len(big), hist=hist.double(),
        channel_absmax=absx.reshape(-1, d).amax(dim=0).float(), massive=massive)


def run(model, batches: list[dict], config: DiagnoseConfig) -> tuple[dict, float]:
    """One diagnosis on prepared batches, and its wall seconds."""
    t0 = time.perf_counter()
    result = collect(model, batches, config, progress=False)
    result["link"] = link_study(result["linears"])
    result["severity"] = severity(result)
    result["reading"] = reading(result)
    return result, time.perf_counter() - t0


def numbers(result: dict) -> dict[str, list[tuple[float, float]]]:
    """Every reported number, grouped by kind; each kind is a list of values in a fixed order."""
    out: dict[str, list[float]] = {}

    def add(kind, values):
        out.setdefault(kind, []).extend(float(v) for v in values)

    for lin in result["linears"]:
        add("sigma1", [lin["sigma1"]])
        add("sigma (kept)", lin["sigma"])
        add("stable_rank", [lin["stable_rank"]])
        add("condition", [lin["condition"]])
        add("energy_top", lin["energy_top"])
        add("pcdr", lin["pcdr"])
        add("pcdr_at_peak", lin["pcdr_at_peak"])
        for side in ("input", "output"):
            s = lin[side]
            add(f"linear {side} max|x|", [s["max_abs"]])
            add(f"linear {side} kurtosis", [s["kurtosis"]])
            add(f"linear {side} std", [s["std"]])
            add(f"linear {side} median|x|", [s["median_abs"]])
            add(f"linear {side} over threshold", [s["over_threshold"]])
            add(f"linear {side} massive count", [s["massive_count"]])
    for r in result["residual"]:
        add("residual max|x|", [r["max_abs"]])
        add("residual kurtosis", [r["kurtosis"]])
        add("residual median|x|", [r["median_abs"]])
        add("residual massive count", [r["massive_count"]])
    for preds in result["link"].values():
        for key, c in preds.items():
            add(f"link spearman ({key})", [c["spearman"]] if c["spearman"] is not None else [])
    add("severity", [v for v in result["severity"].values()])
    return out


def max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x == y:  # also inf == inf
            continue
        worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a seeded random model of this shape instead of --model")
    p.add_argument("--order", default="exact,fast", help="which arm runs first (the machine warms up)")
    args = p.parse_args()
    model, processor = load_model(args.model)
    label = args.model
    if args.shape:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        model, label = Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.shape])).eval(), f"{args.shape} (random weights)"
    base = DiagnoseConfig().validate()
    t0 = time.perf_counter()
    batches = calibration_inputs(model, processor, base)
    calib_s = time.perf_counter() - t0
    arms = {}
    for name in args.order.split(","):
        collect_module.summarize = legacy_summarize if name == "exact" else stats.summarize
        result, wall = run(model, batches, dataclasses.replace(base, spectra=name))
        collect_module.summarize = stats.summarize
        arms[name] = {"result": result, "wall_s": wall, "spectra_s": result["seconds"]["spectra"]}
        print(f"{name:5s}: total {wall:7.1f} s, spectra {result['seconds']['spectra']:6.1f} s")
    fast, exact = arms["fast"], arms["exact"]
    a, b = numbers(fast["result"]), numbers(exact["result"])
    diffs = {kind: max_rel(a[kind], b[kind]) for kind in b}
    fallbacks = sum(lin["spectrum_method"] != "fast" for lin in fast["result"]["linears"])
    ratio = exact["wall_s"] / fast["wall_s"]
    print(f"calibration data {calib_s:.1f} s (shared); exact/fast wall ratio {ratio:.2f}×, spectra ratio "
          f"{exact['spectra_s'] / fast['spectra_s']:.2f}×; {fallbacks} Linears fell back to the dense SVD")
    print("largest relative difference fast vs exact:")
    for kind, d in diffs.items():
        print(f"  {kind:32s} {d:.2e}")
    print("readings identical:", fast["result"]["reading"] == exact["result"]["reading"])
    out = OUT_DIR / f"{args.shape or args.model}-{torch.get_num_threads()}t.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": label, "parameters": sum(p.numel() for p in model.parameters()), "config": base.to_dict(),
        "threads": torch.get_num_threads(), "order": args.order,
        "calibration_s": calib_s, "linears": len(fast["result"]["linears"]), "dense_fallbacks": fallbacks,
        "exact": {"wall_s": exact["wall_s"], "spectra_s": exact["spectra_s"]},
        "fast": {"wall_s": fast["wall_s"], "spectra_s": fast["spectra_s"]},
        "ratio": ratio, "max_rel_diff": diffs,
        "reading_identical": fast["result"]["reading"] == exact["result"]["reading"],
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
