"""Experiment 3, smoke level: MiniLM on polarity sentences, AdamW against AdamW + S2D, over several seeds.

Each (arm, seed) is one `s2d finetune minilm-l6 --task cls` run (160 train / 40 held-out sentences; the seed
picks the split, the head's initialization and the batch order), then the held-out accuracy of the FP model
and of RTN PTQ at W8A8 and W4A4 (per-channel weights, per-token activations). The data is tiny: 40 sentences
per seed, so one sentence is 2.5 points. The table gives, per arm and cell, the mean over seeds with a 95%
t-interval, and the pooled accuracy over every seed's held-out predictions with a 95% Wilson interval; then
the paired S2D − AdamW difference per seed (same split, same initialization) with its t-interval.

A run folder with ptq.json is skipped, so the script resumes.

Usage: python bench/exp_minilm_polarity.py [--seeds 0 1 2 3 4] [--steps 80] [--root runs/exp-minilm] [--table]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ARMS = {"adamw": ["--reg", "none"], "s2d": ["--reg", "s2d", "--reg-option", "refresh_every=20"]}
CELLS = ("FP", "W8A8 rtn", "W4A4 rtn")
OUT = Path(__file__).resolve().parent / "out" / "exp_minilm_polarity.json"


def finetune(arm: str, seed: int, args, out: Path) -> list[str]:
    return ["s2d", "finetune", "minilm-l6", "--task", "cls", *ARMS[arm], "--steps", str(args.steps), "--lr",
            str(args.lr), "--batch-size", "16", "--seq-len", "64", "--warmup", "8", "--seed", str(seed),
            "--eval-every", "0", "--checkpoint-every", str(args.steps), "--out", str(out)]


@torch.no_grad()
def ptq(folder: Path, seed: int) -> dict:
    """Held-out predictions (right/wrong per sentence) of the FP model and of its RTN-quantized copies."""
    from s2d.assets import load_model
    from s2d.eval.classify import predict
    from s2d.quant import QuantConfig, quantize
    from s2d.train.tasks import ClassificationTask

    model, tok = load_model(str(folder / "model"))
    model.eval()
    batch = ClassificationTask(tok, 64, seed).eval_batch()
    labels = batch.pop("labels")
    out = {"n": len(labels), "FP": (predict(model, batch) == labels).tolist()}
    for scheme in ("W8A8", "W4A4"):
        q = quantize(copy.deepcopy(model), QuantConfig.from_scheme(scheme), progress=False)
        out[f"{scheme} rtn"] = (predict(q, batch) == labels).tolist()
    return out


def _t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval."""
    from scipy.stats import t

    if len(values) < 2:
        return values[0], float("nan")
    return statistics.mean(values), t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def _wilson(right: int, n: int) -> tuple[float, float]:
    z = 1.959964
    centre = (right + z * z / 2) / (n + z * z)
    half = z * math.sqrt(right * (n - right) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def summary(root: Path) -> dict:
    runs = {arm: {int(p.name.split("-s")[-1]): json.loads((p / "ptq.json").read_text())
                  for p in sorted(root.glob(f"{arm}-s*")) if (p / "ptq.json").is_file()} for arm in ARMS}
    out: dict = {"arms": {}, "paired": {}}
    for arm, by_seed in runs.items():
        if not by_seed:
            continue
        out["arms"][arm] = {"seeds": sorted(by_seed)}
        for cell in CELLS:
            accs = [sum(r[cell]) / r["n"] for r in by_seed.values()]
            pooled = [x for r in by_seed.values() for x in r[cell]]
            mean, half = _t_interval(accs)
            out["arms"][arm][cell] = {"per_seed": accs, "mean": mean, "t95": half,
                                      "pooled": sum(pooled) / len(pooled), "n_pooled": len(pooled),
                                      "wilson95": _wilson(sum(pooled), len(pooled))}
    common = sorted(set(runs["adamw"]) & set(runs["s2d"]))
    for cell in CELLS if common else ():
        diffs = [(sum(runs["s2d"][s][cell]) - sum(runs["adamw"][s][cell])) / runs["s2d"][s]["n"] for s in common]
        mean, half = _t_interval(diffs)
        out["paired"][cell] = {"seeds": common, "per_seed": diffs, "mean": mean, "t95": half}
    return out


def table(s: dict) -> str:
    from s2d.report import md_table

    rows = []
    for arm, cells in s["arms"].items():
        row = [arm, len(cells["seeds"])]
        for cell in CELLS:
            c = cells[cell]
            row.append(f"{c['mean']:.3f} ± {c['t95']:.3f} (pooled {c['pooled']:.3f}, "
                       f"{c['wilson95'][0]:.2f}–{c['wilson95'][1]:.2f})")
        rows.append(row)
    if s["paired"]:
        rows.append(["S2D − AdamW (paired)", len(s["paired"]["FP"]["seeds"]),
                     *[f"{s['paired'][c]['mean']:+.3f} ± {s['paired'][c]['t95']:.3f}" for c in CELLS]])
    return md_table(["arm", "seeds", *[f"{c} acc" for c in CELLS]], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--root", type=Path, default=Path("runs/exp-minilm"))
    ap.add_argument("--table", action="store_true", help="only summarize the finished runs")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    if not args.table:
        exe = str(Path(sys.executable).with_name("s2d"))
        for seed in args.seeds:
            for arm in ARMS:
                folder = args.root / f"{arm}-s{seed}"
                if (folder / "ptq.json").is_file():
                    continue
                if not (folder / "metrics.json").is_file():
                    cmd = finetune(arm, seed, args, folder)
                    print("$", " ".join(cmd), flush=True)
                    with (args.root / "log.txt").open("a") as f:
                        subprocess.run([exe, *cmd[1:]], check=True, stdout=f, stderr=subprocess.STDOUT)
                (folder / "ptq.json").write_text(json.dumps(ptq(folder, seed)))
    s = summary(args.root)
    s["command"] = "python bench/exp_minilm_polarity.py " + " ".join(sys.argv[1:])
    s["steps"], s["lr"] = args.steps, args.lr
    if not args.table:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(s, indent=1))
    print(table(s))


if __name__ == "__main__":
    main()
