"""Peak memory and wall time of `diagnose` on SmolLM2 at two calibration sizes, each in a fresh process.

Streaming statistics should keep peak RSS flat: the target is < 10% growth from the small to the large run.
Usage: python bench/diagnose_memory.py [--small 16] [--large 128] [--seq-len 512] [--out bench/out/...json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
from s2d import load_model
from s2d.diagnose import DiagnoseConfig, diagnose
model, tok = load_model("smollm2-135m")
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0, c0 = time.perf_counter(), time.process_time()
result = diagnose(model, tok, DiagnoseConfig(n_samples=int(sys.argv[1]), seq_len=int(sys.argv[2])), progress=False)
print(json.dumps({"n_samples": int(sys.argv[1]), "seq_len": int(sys.argv[2]), "wall_s": time.perf_counter() - t0,
                  "cpu_s": time.process_time() - c0, "rss_after_load_mib": loaded,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "spectra_s": result["seconds"]["spectra"], "max_abs": result["severity"]["max_abs"]}))
"""


def measure(n: int, seq_len: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(n), str(seq_len)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--large", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default="bench/out/diagnose_memory.json")
    args = parser.parse_args()
    runs = [measure(n, args.seq_len) for n in (args.small, args.large)]
    for r in runs:
        print(f"{r['n_samples']:>4} x {r['seq_len']} tokens: peak RSS {r['peak_rss_mib']:.0f} MiB (after load "
              f"{r['rss_after_load_mib']:.0f}), wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s")
    growth = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"] - 1
    print(f"peak RSS growth from {args.small} to {args.large} samples: {growth:+.1%} (target < +10%)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "peak_growth": growth, "target": 0.10}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
