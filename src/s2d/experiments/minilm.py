"""Experiment 3, smoke level, read back: MiniLM on polarity sentences, AdamW against AdamW + S2D over several seeds
(bench/exp_minilm_polarity.py runs the arms).

The root holds one finetune run folder per arm and seed, `<arm>-s<seed>`, each with ptq.json: whether each
held-out sentence was classified right, by the FP model and its RTN-quantized copies. The summary gives, per arm
and cell, the mean over seeds with a 95% t-interval and the pooled accuracy with a 95% Wilson interval, then each
S2D arm's paired difference from AdamW per seed (same split, same initialization) with its t-interval.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from s2d.experiments.record import MissingSetting, Said, setting, shared

# `s2d` is the paper's setting (S2D's defaults: coupled, λ 5e-4, τ 0.95 over all rows); `s2d-decoupled` the form
# and selection that moved SmolLM2's outliers (decoupled λ 2, τ 0.8 over the outlier rows' PCDR).
ARMS = {"adamw": ["--reg", "none"], "s2d": ["--reg", "s2d", "--reg-option", "refresh_every=20"],
        "s2d-decoupled": ["--reg", "s2d", "--reg-option", "refresh_every=20", "--reg-option", "form=decoupled",
                          "--reg-option", "lam=2.0", "--reg-option", "pcdr_rows=outliers", "--reg-option", "tau=0.8"]}
CELLS = ("FP", "W8A8 rtn", "W4A4 rtn")
SEEDS, STEPS, LR = (0, 1, 2, 3, 4), 80, 1e-4  # the script's defaults, which its quoted command leaves out
SCRIPT = "python bench/exp_minilm_polarity.py"


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


def folders(root: Path) -> dict[str, dict[int, Path]]:
    """Arm -> seed -> run folder, for the runs whose held-out predictions (ptq.json) exist."""
    return {arm: {int(p.name.rsplit("-s", 1)[1]): p for p in sorted(root.glob(f"{arm}-s[0-9]*"))
                  if (p / "ptq.json").is_file()} for arm in ARMS}


def summary(root: Path) -> dict:
    runs = {arm: {seed: json.loads((p / "ptq.json").read_text()) for seed, p in by_seed.items()}
            for arm, by_seed in folders(root).items()}
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


def settings(root: Path) -> dict:
    """What the runs ran with, from their config.yaml and ptq.json: seeds, steps, lr, batch, held-out sentences
    per seed, and each S2D arm's settings in words (its first seed's; record.Said)."""
    runs = [p for by_seed in folders(root).values() for p in by_seed.values()]
    if not runs:
        raise MissingSetting(f"{root} holds no finished run")
    held_out = sorted({json.loads((p / "ptq.json").read_text())["n"] for p in runs})
    first = {arm: next(iter(by_seed.values())) for arm, by_seed in folders(root).items() if by_seed}
    s2d = {arm: Said(folder) for arm, folder in first.items() if setting(folder, "reg") == "s2d"}
    return {"seeds": sorted({int(p.name.rsplit("-s", 1)[1]) for p in runs}),
            "steps": sorted({setting(p, "steps") for p in runs}), "lr": sorted({setting(p, "lr") for p in runs}),
            "batch": shared(runs, "batch_size"), "held_out": held_out, "s2d": s2d}


def command(s: dict) -> str:
    """The script's command line that runs these folders (settings(root)): its defaults are left out."""
    args = []
    if s["seeds"] != list(SEEDS):
        args += ["--seeds", *map(str, s["seeds"])]
    for flag, values, default in (("--steps", s["steps"], STEPS), ("--lr", s["lr"], LR)):
        if len(values) > 1:
            raise MissingSetting(f"the runs differ in {flag} ({', '.join(map(str, values))}): no one command ran them")
        if values != [default]:
            args += [flag, str(values[0])]
    return f"{SCRIPT} " + " ".join(args)


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


def figure(s: dict, path: Path, held_out: str) -> Path:
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
    ax.set(ylabel=f"held-out accuracy ({held_out} sentences per seed)",
           title="MiniLM on polarity: AdamW vs S2D arms, per seed")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
