"""What compression buys on a CPU: SmolLM2 tokens/s (prefill, decode) and peak RSS, dense vs low-rank, side by side.

Variants: the dense fp32 model; rom and asvd at each --keeps fraction as `s2d compress` leaves them (each
Linear two thin Linears, A then B); and the same models merged (W = B·A back in one dense Linear). Each is
compressed once in this process and saved to a temp folder; then every variant is loaded and measured in its
own child process, so its peak RSS (ru_maxrss) is its own. The dense model is measured again last, to show
how far the machine drifted during the run.

- prefill: one forward over a P-token prompt at batch 1, logits for the last token only (what generation
  needs), warm-up then --repeats, median; tokens/s = P / time.
- decode: greedy, batch 1, with the KV cache: after an untimed --decode-prompt-token prefill, N new tokens
  one forward each; tokens/s = N / time, median over --decode-repeats.
- per-shape microbenchmark: for each distinct (d_in, d_out, rank) of the compressed models, dense x·Wᵀ
  against x·Aᵀ·Bᵀ at 1 token (decode) and P tokens (prefill), timed as `s2d compress --skip-slower` times them.

Calibration is small by default (--calib-samples): the ranks come from the budget alone, and speed depends on
the shapes only, not on the factors' values.

Usage: python bench/inference_speed.py [--methods rom,asvd] [--keeps 0.9,0.8,0.7] [--prompt 256]
       [--decode-tokens 64] [--decode-prompt 32] [--repeats 5] [--decode-repeats 3] [--threads 1]
       [--calib-samples 32] [--no-merged]. Writes bench/out/inference_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# No torch here: on Linux a child's ru_maxrss starts at the RSS of the process that spawned it (the high-water
# mark survives fork/vfork + exec), so the parent stays a small stdlib process while the children measure, and
# the compression runs in a child of its own (--build-into).

CHILD = """
import json, resource, statistics, sys, time
import torch
folder, ids_path, repeats, decode_repeats, decode_tokens, decode_prompt, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))
import s2d
from s2d.commands.load import load_model
from s2d.lowrank.budget import model_parameters
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model, _ = load_model(folder)
model.eval()
ids = torch.load(ids_path)
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

cpu = {"prefill": [], "decode": []}  # process time beside wall time: a gap exposes a busy machine

def prefill():
    t0, c0 = time.perf_counter(), time.process_time()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cpu["prefill"].append(time.process_time() - c0)
    return time.perf_counter() - t0

def decode():
    out = model(input_ids=ids[:, :int(decode_prompt)], use_cache=True, logits_to_keep=1)
    past, nxt, tokens = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(int(decode_tokens)):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
    cpu["decode"].append(time.process_time() - c0)
    return time.perf_counter() - t0, tokens

with torch.no_grad():
    prefill()  # warm-up
    prefill_s = [prefill() for _ in range(int(repeats))]
    n, decode_tokens = decode_tokens, min(8, int(decode_tokens))
    decode()  # warm-up, on a few tokens
    decode_tokens = n
    runs = [decode() for _ in range(int(decode_repeats))]
decode_s = [t for t, _ in runs]
cpu = {"prefill": cpu["prefill"][1:], "decode": cpu["decode"][1:]}  # the warm-ups out
print(json.dumps({"params": model_parameters(model), "prefill_s": prefill_s, "decode_s": decode_s, "cpu_s": cpu,
                  "prefill_tok_s": ids.shape[1] / statistics.median(prefill_s),
                  "decode_tok_s": int(decode_tokens) / statistics.median(decode_s), "greedy": runs[0][1],
                  "rss_import_mb": rss_import, "rss_loaded_mb": rss_loaded,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build_variants(args, tmp: Path) -> None:
    """Save dense, compressed and merged folders under `tmp`, and variants.json: their descriptions and the
    factorized shapes."""
    import copy

    import torch

    import s2d  # noqa: F401  (offline defaults before transformers loads)
    from s2d.assets import calibration_batch, load_model, wiki_text
    from s2d.lowrank import FactorizedLinear, LowRankConfig, compress, save
    from s2d.lowrank.budget import model_parameters

    torch.set_num_threads(args.threads)
    dense, tok = load_model("smollm2-135m")
    variants = {"dense": {"folder": str(tmp / "dense"), "kind": "dense", "params": model_parameters(dense)}}
    dense.save_pretrained(tmp / "dense")
    tok.save_pretrained(tmp / "dense")
    calib = calibration_batch(tok, wiki_text("train"), args.calib_samples, 128, seed=0)
    shapes = set()
    for method in args.methods:
        for keep in args.keeps:
            model = copy.deepcopy(dense)
            report = compress(model, LowRankConfig(method=method, keep=keep), calib=calib, progress=False)
            name = f"{method}-{round(keep * 100)}"
            save(model, tmp / name, tok, method=method)
            layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
            shapes |= {(m.in_features, m.out_features, m.rank) for m in layers}
            variants[name] = {"folder": str(tmp / name), "kind": "factorized", "method": method, "keep": keep,
                              "params": model_parameters(model), "layers_decomposed": len(layers),
                              "fraction_kept": report.summary["fraction_kept"],
                              "compress_seconds": report.seconds}
            if args.merged:
                save(model, tmp / f"{name}-merged", tok, method=method, merge=True)
                variants[f"{name}-merged"] = {"folder": str(tmp / f"{name}-merged"), "kind": "merged", "method": method,
                                              "keep": keep, "of": name}
            print(f"compressed {name}: {len(layers)} Linears factorized, {report.summary['fraction_kept']:.2%} "
                  f"of the parameters kept ({report.seconds:.0f} s)", flush=True)
    torch.save(calibration_batch(tok, wiki_text("validation"), 1, args.prompt, seed=1), tmp / "prompt.pt")
    (tmp / "variants.json").write_text(json.dumps({"variants": variants, "shapes": sorted(shapes)}))


def measure(variant: dict, args, tmp: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, variant["folder"], str(tmp / "prompt.pt"),
                           str(args.repeats), str(args.decode_repeats), str(args.decode_tokens),
                           str(args.decode_prompt), str(args.threads)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child for {variant['folder']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def microbench(shapes: list[tuple[int, int, int]], prompt: int, threads: int) -> list[dict]:
    import torch

    from s2d.lowrank.speed import time_matmuls

    torch.set_num_threads(threads)
    rows = []
    for d_in, d_out, rank in shapes:
        row = {"d_in": d_in, "d_out": d_out, "rank": rank, "kappa": d_in * d_out / (d_in + d_out),
               "fewer_flops": rank * (d_in + d_out) < d_in * d_out}
        for label, tokens in (("decode", 1), ("prefill", prompt)):
            dense_s, factorized_s = time_matmuls(d_in, d_out, rank, tokens)
            row[label] = {"tokens": tokens, "dense_us": dense_s * 1e6, "factorized_us": factorized_s * 1e6,
                          "speedup": dense_s / factorized_s}
        rows.append(row)
    return rows


def _names(items: list[tuple[str, float]]) -> str:
    return ", ".join(f"{n} ({r:.2f}x)" for n, r in items) or "none"


def verdict(results: dict[str, dict], micro: list[dict], noise: float) -> str:
    """A plain reading of the numbers: where factorized is faster, where it loses, merged against dense."""
    fact = {n: r for n, r in results.items() if r["kind"] == "factorized"}
    lines = []
    for phase in ("prefill", "decode"):
        ratios = [(n, r[f"{phase}_ratio"]) for n, r in fact.items()]
        faster = [x for x in ratios if x[1] > 1 + noise]
        slower = [x for x in ratios if x[1] < 1 - noise]
        even = [x for x in ratios if x not in faster and x not in slower]
        lines.append(f"{phase.capitalize()}: factorized beats dense for {_names(faster)}; two thin matmuls lose to "
                     f"one dense one for {_names(slower)}; within the ±{noise:.0%} noise band: {_names(even)}.")
    merged = [r for r in results.values() if r["kind"] == "merged"]
    if merged:
        lo = min(min(r["prefill_ratio"], r["decode_ratio"]) for r in merged)
        hi = max(max(r["prefill_ratio"], r["decode_ratio"]) for r in merged)
        within = 1 - noise <= lo and hi <= 1 + noise
        lines.append(f"Merged models (dense shapes again) run at {lo:.2f}-{hi:.2f}x dense, "
                     + ("within the noise band." if within else f"outside the ±{noise:.0%} noise band: the machine "
                        "was not steady enough to compare them."))
    for phase in ("decode", "prefill"):
        slow = [m for m in micro if m[phase]["speedup"] < 1]
        hinted = sum(not m["fewer_flops"] for m in slow)
        lines.append(f"Per Linear shape at {micro[0][phase]['tokens'] if micro else '-'} token(s): factorized is "
                     f"slower for {len(slow)} of {len(micro)} (d_in, d_out, rank) shapes"
                     + (f", {hinted} of which the FLOP count predicted" if slow else "") + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["rom", "asvd"])
    ap.add_argument("--keeps", type=lambda s: [float(k) for k in s.split(",")], default=[0.9, 0.8, 0.7])
    ap.add_argument("--prompt", type=int, default=256, help="prefill prompt length P")
    ap.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode run")
    ap.add_argument("--decode-prompt", type=int, default=32, help="prompt tokens before decoding (untimed)")
    ap.add_argument("--repeats", type=int, default=5, help="timed prefill forwards (after one warm-up)")
    ap.add_argument("--decode-repeats", type=int, default=3, help="timed decode runs (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every process")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration sequences of 128 tokens")
    ap.add_argument("--no-merged", dest="merged", action="store_false", help="skip the merged variants")
    ap.add_argument("--out", default="bench/out/inference_speed.json")
    ap.add_argument("--build-into", help=argparse.SUPPRESS)  # internal: the child that compresses and saves
    args = ap.parse_args()
    if args.build_into:
        build_variants(args, Path(args.build_into))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--build-into", str(tmp)], check=True)
        built = json.loads((tmp / "variants.json").read_text())
        variants, shapes = built["variants"], [tuple(s) for s in built["shapes"]]
        results = {}
        for name, variant in [*variants.items(), ("dense-again", variants["dense"])]:
            m = measure(variant, args, tmp)
            results[name] = {**{k: v for k, v in variant.items() if k != "folder"}, **m}
            print(f"measured {name}: prefill {m['prefill_tok_s']:.0f} tok/s, decode {m['decode_tok_s']:.1f} tok/s",
                  flush=True)
    again = results.pop("dense-again")
    base = results["dense"]
    drift = {p: again[f"{p}_tok_s"] / base[f"{p}_tok_s"] - 1 for p in ("prefill", "decode")}
    for r in results.values():
        r["prefill_ratio"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_ratio"] = r["decode_tok_s"] / base["decode_tok_s"]
        if r["kind"] == "merged":
            r["greedy_agrees_with_factorized"] = sum(
                a == b for a, b in zip(r["greedy"], results[r["of"]]["greedy"], strict=True)) / len(r["greedy"])
    micro = microbench(shapes, args.prompt, args.threads)
    noise = max(0.03, *map(abs, drift.values()))

    print(f"\nSmolLM2-135M fp32, batch 1, {args.threads} thread(s): prefill {args.prompt} tokens (median of "
          f"{args.repeats}), decode {args.decode_tokens} tokens after {args.decode_prompt} (median of "
          f"{args.decode_repeats}); each variant in its own process")
    print(f"{'variant':<16} {'params':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill x':>10} "
          f"{'decode x':>9} {'peak RSS MB':>12}")
    for name, r in results.items():
        print(f"{name:<16} {r['params'] / 1e6:>7.1f}M {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.1f} "
              f"{r['prefill_ratio']:>10.2f} {r['decode_ratio']:>9.2f} {r['peak_rss_mb']:>12.0f}")
    print(f"dense measured again at the end: prefill {drift['prefill']:+.1%}, decode {drift['decode']:+.1%} "
          "(machine drift)")
    print("\nper Linear shape, median µs per matmul (dense x·Wᵀ vs factorized x·Aᵀ·Bᵀ, no bias):")
    print(f"{'d_in':>5} {'d_out':>5} {'rank':>5} {'kappa':>6} {'flops<':>6} {'1 tok dense':>12} {'fact':>8} "
          f"{'x':>5} {f'{args.prompt} tok dense':>14} {'fact':>8} {'x':>5}")
    for m in micro:
        d, p = m["decode"], m["prefill"]
        fewer = "yes" if m["fewer_flops"] else "no"
        print(f"{m['d_in']:>5} {m['d_out']:>5} {m['rank']:>5} {m['kappa']:>6.0f} {fewer:>6} {d['dense_us']:>12.1f}"
              f" {d['factorized_us']:>8.1f} {d['speedup']:>5.2f} {p['dense_us']:>14.1f} "
              f"{p['factorized_us']:>8.1f} {p['speedup']:>5.2f}")
    reading = verdict(results, micro, noise)
    print("\n" + reading)

    for r in results.values():
        r.pop("folder", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    out.write_text(json.dumps({"settings": {**vars(args), "torch": torch.__version__,
                                            "machine": platform.processor() or platform.machine()},
                               "variants": results, "dense_again": again, "drift": drift, "microbench": micro,
                               "reading": reading}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
