"""Levers of the S2D fine-tune in the +resid regime, read back (bench/exp_vit_static.py --levers NAME ...).

The arms' S2D fine-tune (vit.S2D: decoupled, λ 0.5, outlier-row PCDR at the selected τ) left the residual stream's
max |x| where AdamW's was, so it could not help the cells where that max sets the step. Each lever is the same
fine-tune of `pretrain-long` (same seeds, steps and lr) with some S2D options changed, in `lever-<name>-s<seed>`
with a ptq.json of LEVER_CELLS. Everything is paired per seed against `ft-adamw`, and `ft-s2d` (the arms' S2D) is
shown beside the levers.

Why these levers. The decoupled step shrinks a selected σ by η·λ·σ² per step, so over the fine-tune's steps a σ
falls at most to about 1 / (λ · Σ η) whatever the task gradient does; where that bound sits above the σ of the
selected Linears the decay barely acts, and a larger λ brings it down to them (the table shows how far σ₁ of the
decayed Linears moved).
The residual stream's outliers are written by the Linears that add to it (attention's o and the MLP's fc2/down), so
the other lever aims S2D at those alone (`roles`), with PCDR selecting among them or (`selection=all`) decaying the
top k_max components of every writer, S2D's selection switched off.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from s2d.experiments import vit_static
from s2d.experiments.vit import S2D
from s2d.experiments.vit_static import (
    TARGET_GAIN,
    _beyond,
    _ci,
    _json,
    _pm,
    arm_runs,
    residual_spread,
    t_interval,
)

WRITERS = "o,down,fc2"  # the roles that add to the residual stream, in every family's adapter
LEVERS = {"lam5": {"lam": 5}, "lam20": {"lam": 20}, "writers-lam5": {"lam": 5, "roles": WRITERS},
          "writers-all-lam5": {"lam": 5, "roles": WRITERS, "selection": "all"},
          "writers-all-lam20": {"lam": 20, "roles": WRITERS, "selection": "all"}}
LEVER_CELLS = ("FP", "W4A4 static", "W5A5 static+resid", "W4A4 static+resid", "W4A4 dynamic+resid")
TARGET_CELL = "W4A4 static+resid"  # the cell where AdamW's per-tensor static gap is ≥ 5 points (vit_static's run)
BASE, DEFAULT = "ft-adamw", "ft-s2d"


def s2d_flags(base: list[str], overrides: dict) -> list[str]:
    """`s2d finetune` regularizer flags: `base` (--reg s2d --reg-option K=V ...) with the `overrides` options
    replacing or joining its own."""
    options, rest, items = {}, [], iter(base)
    for flag in items:
        if flag == "--reg-option":
            key, _, value = next(items).partition("=")
            options[key] = value
        else:
            rest.append(flag)
    options.update({k: str(v) for k, v in overrides.items()})
    return [*rest, *[a for k, v in options.items() for a in ("--reg-option", f"{k}={v}")]]


def arm_names(root: Path) -> list[str]:
    """ft-adamw, ft-s2d, then the levers (in LEVERS order) that have at least one measured run."""
    levers = [f"lever-{name}" for name in LEVERS if any((p / "ptq.json").is_file()
                                                         for p in root.glob(f"lever-{name}-s[0-9]*"))]
    return [BASE, DEFAULT, *levers] if levers else []


def summary(root: Path) -> dict:
    """Per arm: seeds, each LEVER_CELLS' mean/SD and paired difference against ft-adamw (with a 95% t half-width),
    the residual max |x| and its paired % change, and how many Linears S2D decayed at its first and last refresh."""
    arms = arm_names(root)
    runs = arm_runs(root, tuple(arms))
    out = {}
    for arm in arms:
        paired = sorted(set(runs[arm]) & set(runs[BASE]))
        cells = {}
        for cell in LEVER_CELLS:
            vals = [100 * r[cell] for r in runs[arm].values() if cell in r]
            diffs = [100 * (runs[arm][s][cell] - runs[BASE][s][cell]) for s in paired
                     if cell in runs[arm][s] and cell in runs[BASE][s]]
            diff, half = t_interval(diffs) if diffs and arm != BASE else (None, None)
            gaps = [100 * (r["FP"] - r[cell]) for r in runs[arm].values() if cell in r]
            cells[cell] = {"mean": statistics.mean(vals) if vals else None,
                           "sd": statistics.stdev(vals) if len(vals) > 1 else None, "diff": diff, "half": half,
                           "gap": statistics.mean(gaps) if gaps and cell != "FP" else None}
        change = [100 * (runs[arm][s]["max_abs"]["residual"] / runs[BASE][s]["max_abs"]["residual"] - 1)
                  for s in paired]
        spread, base_spread = (_spreads(runs[a]) for a in (arm, BASE))
        median_change = [100 * (spread[s][0] / base_spread[s][0] - 1) for s in paired
                         if s in spread and s in base_spread]
        refreshes = [r for r in (_refreshes(root / f"{arm}-s{s}") for s in runs[arm]) if r]
        decayed = [(len(r[0]["selected"]), len(r[-1]["selected"])) for r in refreshes]
        shrunk = [c for c in map(_sigma_change, refreshes) if c is not None]
        out[arm] = {"seeds": sorted(runs[arm]), "paired": paired, "cells": cells,
                    "residual": statistics.mean(r["max_abs"]["residual"] for r in runs[arm].values()),
                    "residual_change": t_interval(change) if change and arm != BASE else (None, None),
                    "median": statistics.mean(m for m, _ in spread.values()) if spread else None,
                    "median_change": t_interval(median_change) if median_change and arm != BASE else (None, None),
                    "peak_to_median": statistics.mean(r for _, r in spread.values()) if spread else None,
                    "decayed": tuple(statistics.mean(d[i] for d in decayed) for i in (0, 1)) if decayed else None,
                    "sigma_change": statistics.mean(shrunk) if shrunk else None}
    return out


def _spreads(by_seed: dict[int, dict]) -> dict[int, tuple[float, float]]:
    """residual_spread of each seed's record that has the per-block entry."""
    return {s: sp for s, r in by_seed.items() if (sp := residual_spread(r["max_abs"])) is not None}


def _refreshes(folder: Path) -> list[dict]:
    """The S2D refreshes one run's metrics.json kept (none for a run without S2D)."""
    return (_json(folder / "metrics.json") or {}).get("refreshes") or []


def _sigma_change(refreshes: list[dict]) -> float | None:
    """The mean % change of σ₁, first → last refresh, over the Linears S2D decayed at both (None if there are none)."""
    if len(refreshes) < 2:
        return None
    first, last = refreshes[0]["selected_sigma"], refreshes[-1]["selected_sigma"]
    both = sorted(set(first) & set(last))
    return statistics.mean(100 * (last[n][0] / first[n][0] - 1) for n in both) if both else None


def options(arm: str) -> str:
    if arm == BASE:
        return "--reg none"
    if arm == DEFAULT:
        return "the arms' S2D (λ 0.5)"
    return " ".join(f"{k}={v}" for k, v in LEVERS[arm.removeprefix("lever-")].items())


def table(root: Path) -> str:
    """One row per arm: options, seeds, Linears decayed, the residual max and its paired change, then each cell's
    mean ± SD with its paired difference against AdamW."""
    from s2d.report import md_table

    rows = []
    for arm, s in summary(root).items():
        decayed = "-" if s["decayed"] is None else f"{s['decayed'][0]:.3g} → {s['decayed'][1]:.3g}"
        sigma = "-" if s["sigma_change"] is None else f"{s['sigma_change']:+.1f}"
        row = [arm, options(arm), len(s["seeds"]), decayed, sigma, s["residual"],
               "" if arm == BASE else _ci(*s["residual_change"]), "-" if s["median"] is None else s["median"],
               "" if arm == BASE else _ci(*s["median_change"]),
               "-" if s["peak_to_median"] is None else s["peak_to_median"]]
        for cell in LEVER_CELLS:
            e = s["cells"][cell]
            row.append(_pm(e["mean"], e["sd"]) + ("" if arm == BASE else f" ({_ci(e['diff'], e['half'])})"))
        rows.append(row)
    return md_table(["arm", "S2D options changed", "seeds", "Linears decayed (first → last refresh)",
                     "σ₁ of those decayed throughout, first → last refresh, %",
                     "residual max |x|", "its change vs AdamW, % [95% t]", "residual median |x| (block mean)",
                     "its change vs AdamW, % [95% t]", "residual max / median (block mean)",
                     *[f"{cell} (test acc %, mean ± SD (− AdamW [95% t]))" for cell in LEVER_CELLS]], rows)


def intro(root: Path) -> str:
    """The settings paragraph: what every lever shares with the arms, read from the run folders."""
    from s2d.experiments.record import setting

    folders = [f for arm in arm_names(root) for f in sorted(root.glob(f"{arm}-s[0-9]*")) if (f / "ptq.json").is_file()]
    spe = vit_static.plan(root)["steps_per_epoch"]
    epochs = " / ".join(sorted({f"{setting(f, 'steps') / spe:g}" for f in folders}))
    lrs = " / ".join(sorted({f"{setting(f, 'lr'):g}" for f in folders}))
    base = (_json(root / "selection.json") or {}).get("reg_option", "")
    return (f"Each arm fine-tunes `pretrain-long` (above) for {epochs} epoch(s) at lr {lrs}, the seed drawing the "
            f"batches, and is paired per seed with `ft-adamw`. The levers are the arms' S2D (`{' '.join(S2D)} "
            f"--reg-option {base}`) with the options listed changed; `roles={WRITERS}` keeps S2D to the Linears "
            "that write the residual stream, `selection=all` decays the top k_max components of every targeted "
            "Linear without PCDR's choice. Cells as above (+resid: the residual stream quantized at every block's "
            "output). ± is the sample SD over seeds, the interval the 95% Student-t interval of the paired per-seed "
            "differences.")


def reading(root: Path) -> list[str]:
    """The plain words: AdamW's gap at the target cell, what each S2D setting did to the outlier and to accuracy
    there, whether any reached the target, and at what FP cost."""
    s = summary(root)
    if not s:
        return []
    base = s[BASE]["cells"]
    lines = [f"AdamW ({len(s[BASE]['seeds'])} seeds) loses {base[TARGET_CELL]['gap']:.2f} points to FP at "
             f"{TARGET_CELL} (per-token control W4A4 dynamic+resid: {base['W4A4 dynamic+resid']['gap']:.2f}); its "
             f"residual max |x| is {s[BASE]['residual']:.3g}."]
    hits = []
    for arm, e in s.items():
        if arm == BASE or not e["paired"]:
            continue
        t, fp = e["cells"][TARGET_CELL], e["cells"]["FP"]
        if t["diff"] is not None and t["diff"] >= TARGET_GAIN and _beyond(t) > 0:
            hits.append(arm)
        beyond = [c for c in LEVER_CELLS if c != "FP" and _beyond(e["cells"][c]) > 0]
        worse = [c for c in LEVER_CELLS if c != "FP" and _beyond(e["cells"][c]) < 0]
        lines.append(f"{arm} ({options(arm)}, {len(e['paired'])} paired seeds): residual max |x| "
                     f"{_ci(*e['residual_change'])} % against AdamW; {TARGET_CELL} {_ci(t['diff'], t['half'])} "
                     f"points; FP {_ci(fp['diff'], fp['half'])}"
                     + (f"; better beyond the interval at {', '.join(beyond)}" if beyond else "")
                     + (f"; worse beyond it at {', '.join(worse)}" if worse else "") + ".")
    lines.append(f"Target (≥ +{TARGET_GAIN:g} points beyond the interval at {TARGET_CELL}): "
                 + (f"reached by {', '.join(hits)}." if hits else "reached by no S2D setting tried here."))
    moved = [(arm, e) for arm, e in s.items() if arm != BASE and e["residual_change"][0] is not None]
    if moved:
        arm, e = min(moved, key=lambda ae: ae[1]["residual_change"][0])
        lines.append(f"The largest cut of the residual max is {arm}'s ({e['residual_change'][0]:+.1f} %); with it "
                     f"{TARGET_CELL} moves {_ci(e['cells'][TARGET_CELL]['diff'], e['cells'][TARGET_CELL]['half'])} "
                     f"points and its own gap to FP is {e['cells'][TARGET_CELL]['gap']:.2f}." + _scaled(s[BASE], e))
    return lines


def _scaled(base: dict, e: dict) -> str:
    """Whether a cut of the residual max came with the median: the stream scaled down as a whole leaves the ratio
    that sets the per-tensor step against typical values, and so the rounding error relative to them, in place."""
    if e["median_change"][0] is None or base["peak_to_median"] is None or e["peak_to_median"] is None:
        return ""
    ratio = 100 * (e["peak_to_median"] / base["peak_to_median"] - 1)
    words = (" The stream was scaled down as a whole, not its peaks" if abs(ratio) < abs(e["residual_change"][0]) / 2
             else " The peaks fell faster than the typical values")
    return (f"{words}: its median |x| changed {e['median_change'][0]:+.1f} % too, so the max / median |x| of the "
            f"block outputs went {base['peak_to_median']:.3g} → {e['peak_to_median']:.3g} ({ratio:+.1f} %); a "
            "per-tensor static step scales with the max, so what it costs the typical values "
            + ("hardly changed." if abs(ratio) < abs(e["residual_change"][0]) / 2 else "fell with it."))
