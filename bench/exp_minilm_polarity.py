"""Experiment 3, smoke level: MiniLM on polarity sentences, AdamW against AdamW + S2D, over several seeds.

Each (arm, seed) is one `s2d finetune minilm-l6 --task cls` run (160 train / 40 held-out sentences; the seed
picks the split, the head's initialization and the batch order), then the held-out accuracy of the FP model
and of RTN PTQ at W8A8 and W4A4 (per-channel weights, per-token activations). The data is tiny: 40 sentences
per seed, so one sentence is 2.5 points. The table gives, per arm and cell, the mean over seeds with a 95%
t-interval, and the pooled accuracy over every seed's held-out predictions with a 95% Wilson interval; then
each S2D arm's paired difference from AdamW per seed (same split, same initialization) with its t-interval.

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

# `s2d` is the paper's setting (coupled, λ 5e-4, τ 0.95 over all rows); `s2d-decoupled` the form and selection
# that moved SmolLM2's outliers (decoupled λ 2, τ 0.8 over the outlier rows' PCDR).
ARMS = {"adamw": ["--reg", "none"], "s2d": ["--reg", "s2d", "--reg-option", "refresh_every=20"],
        "s2d-decoupled": ["--reg", "s2d", "--reg-option", "refresh_every=20", "--reg-option", "form=decoupled",
                          "--reg-option", "lam=2.0", "--reg-option", "pcdr_rows=outliers", "--reg-option", "tau=0.8"]}
CELLS = ("FP", "W8A8 rtn", "W4A4 rtn")
OUT = Path(__file__).resolve().parent / "out" / "exp_minilm_polarity.json"


def finetune(arm: str, seed: int, args, out: Path) -> list[str]:
    return ["s2d", "finetune", "minilm-l6", "--task", "cls", *ARMS[arm], "--steps", str(args.steps), "--lr",
            str(args.lr), "--batch-size", "16", "--seq-len", "64", "--warmup", "8", "--seed", str(seed),
            "--eval-every", "0", "--checkpoint-every", str(args.steps), "--resume", "--out", str(out)]


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


def _selected(folder: Path) -> int | None:
    """How many Linears S2D decayed after its first refresh (None for AdamW)."""
    refreshes = json.loads((folder / "metrics.json").read_text()).get("refreshes") or []
    return len(refreshes[0]["selected"]) if refreshes else None


def summary(root: Path) -> dict:
    runs = {arm: {int(p.name.rsplit("-s", 1)[1]): json.loads((p / "ptq.json").read_text())
                  for p in sorted(root.glob(f"{arm}-s[0-9]*")) if (p / "ptq.json").is_file()} for arm in ARMS}
    out: dict = {"arms": {}, "paired": {}}
    for arm, by_seed in runs.items():
        if not by_seed:
            continue
        out["arms"][arm] = {"seeds": sorted(by_seed), "selected": [_selected(root / f"{arm}-s{s}") for s in
                                                                    sorted(by_seed)]}
        for cell in CELLS:
            accs = [sum(r[cell]) / r["n"] for r in by_seed.values()]
            pooled = [x for r in by_seed.values() for x in r[cell]]
            mean, half = _t_interval(accs)
            out["arms"][arm][cell] = {"per_seed": accs, "mean": mean, "t95": half,
                                      "pooled": sum(pooled) / len(pooled), "n_pooled": len(pooled),
                                      "wilson95": _wilson(sum(pooled), len(pooled))}
    for arm in ARMS:
        common = sorted(set(runs["adamw"]) & set(runs[arm])) if arm != "adamw" else []
        for cell in CELLS if common else ():
            diffs = [(sum(runs[arm][s][cell]) - sum(runs["adamw"][s][cell])) / runs[arm][s]["n"] for s in common]
            mean, half = _t_interval(diffs)
            out["paired"].setdefault(arm, {})[cell] = {"seeds": common, "per_seed": diffs, "mean": mean, "t95": half}
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
    for arm, paired in s["paired"].items():
        rows.append([f"{arm} − adamw (paired)", len(paired["FP"]["seeds"]),
                     *[f"{paired[c]['mean']:+.3f} ± {paired[c]['t95']:.3f}" for c in CELLS]])
    return md_table(["arm", "seeds", *[f"{c} acc" for c in CELLS]], rows)


def reading(s: dict) -> list[str]:
    """Each S2D arm's paired difference from AdamW, and whether its 95% interval excludes zero."""
    lines = []
    for arm, paired in s["paired"].items():
        for cell, d in paired.items():
            lo, hi = d["mean"] - d["t95"], d["mean"] + d["t95"]
            if not any(d["per_seed"]):
                verdict = "the same number of right answers on every seed"
            else:
                verdict = (f"95% interval {100 * lo:+.1f} to {100 * hi:+.1f}, "
                           + ("excludes 0" if lo > 0 or hi < 0 else "includes 0: no difference shown at this size"))
            lines.append(f"{arm} − AdamW, {cell}: {100 * d['mean']:+.1f} points over {len(d['seeds'])} paired "
                         f"seeds ({verdict}).")
        sel = s["arms"][arm].get("selected")
        if sel:
            lines.append(f"{arm} decayed {', '.join(str(n) for n in sel)} Linear(s) after its first refresh, per "
                         "seed.")
    return lines


def figure(s: dict, path: Path) -> Path:
    """Per-seed held-out accuracy of each arm, by cell, with the mean and its 95% t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from s2d.report.figures import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=110)
    width = 0.8 / len(s["arms"])
    for j, (arm, cells) in enumerate(s["arms"].items()):
        for i, cell in enumerate(CELLS):
            x = i + (j - (len(s["arms"]) - 1) / 2) * width
            c = cells[cell]
            ax.scatter([x] * len(c["per_seed"]), c["per_seed"], s=12, alpha=0.6, color=f"C{j}",
                       label=arm if i == 0 else None)
            ax.errorbar([x + 0.06], [c["mean"]], yerr=[[c["t95"]], [c["t95"]]], fmt="_", color=f"C{j}", capsize=3)
    ax.set_xticks(range(len(CELLS)), CELLS)
    ax.set(ylabel="held-out accuracy (40 sentences per seed)", title="MiniLM on polarity: AdamW vs S2D arms, per seed")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--root", type=Path, default=Path("runs/exp-minilm"))
    ap.add_argument("--table", action="store_true", help="only summarize the finished runs (and rewrite the JSON)")
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
    s["command"] = "python bench/exp_minilm_polarity.py " + " ".join(a for a in sys.argv[1:] if a != "--table")
    s["steps"], s["lr"] = args.steps, args.lr
    OUT.parent.mkdir(parents=True, exist_ok=True)  # --table re-summarizes what finished
    OUT.write_text(json.dumps(s, indent=1))
    print(table(s))


if __name__ == "__main__":
    main()
