"""The ViT arm in the per-tensor static regime, read back (bench/exp_vit_static.py runs the stages).

S2D shrinks the largest activations; that can only help quantization where the largest activation sets the step of
every token: per-tensor static activation scales (RepQ-ViT's regime). The root holds
- `plan.json`: the script's command line and sizes (steps per epoch, training images, calibration images);
- `pretrain-long` (AdamW) and `pretrain-long-s2d` (AdamW+S2D from step 0), the same seeded deeper scratch ViT and
  batches, each a finetune run folder with `curve.json` (per kept checkpoint: max |x| on the calibration images
  and the FP and per-tensor static PTQ accuracies) and `ptq.json` (every cell of CELLS on the final model);
- `selection.json`: S2D's τ, chosen on `pretrain-long` before any S2D run (bench/exp_vit.py's rule);
- `ft-adamw-s<seed>` and `ft-s2d-s<seed>`: fine-tunes of `pretrain-long`, each with `ptq.json`;
- `qat-adamw-s<seed>` and `qat-s2d-s<seed>`: the same fine-tunes with W4A4 QAT at per-tensor static activation
  scales (QAT_OPTIONS: calibrated on the first training batch, then learned by LSQ), each with `qat.json`
  (QAT_CELLS: the saved integer model with its learned scales, its float weights, and static PTQ of those weights).
Accuracies in the JSON are fractions; the tables show percentage points. Nothing here is typed in by hand
except PAPER, the published numbers printed beside ours as theirs.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from s2d.experiments.record import MissingSetting, setting

PTQ_SCHEMES = ("W8A8", "W6A6", "W5A5", "W4A4")
# static: per-tensor static scales on the block Linears' inputs; +reparam adds ln_reparam; +repq is RepQ-ViT's full
# setting: ln_reparam, the post-softmax probabilities on a log√2 grid at the scheme's activation bits, and the patch
# embedding and classifier at W8A8 (both stay in floating point in the other cells). +resid also quantizes the
# residual stream at every block's output (s2d.quant.residual: FQ-ViT's fully quantized regime, where the stream's
# outliers meet a quantizer); "dynamic+resid" is its per-token control.
CELLS = ("FP", *[f"{s} static{r}" for s in PTQ_SCHEMES for r in ("", "+reparam", "+repq")],
         *[f"{s} static+resid" for s in PTQ_SCHEMES], *[f"{s} dynamic+resid" for s in PTQ_SCHEMES], "W4A4 dynamic")
CURVE_CELLS = ("FP", "W6A6 static", "W6A6 static+reparam", "W4A4 static", "W4A4 static+reparam",
               "W6A6 static+resid", "W4A4 static+resid", "W4A4 dynamic+resid")
PRETRAINS = {"pretrain-long": "AdamW", "pretrain-long-s2d": "AdamW+S2D"}
ARMS = ("ft-adamw", "ft-s2d")
CALIB = 32  # training images the static scales (and ln_reparam's channel ranges) are calibrated on
TARGET_GAIN, TARGET_GAP = 3.0, 5.0  # points: S2D − AdamW wanted at a static cell where AdamW loses this much to FP

# The paper's numbers (SigLIP2-B, ImageNet-1k top-1, AdamW → AdamW+S2D), printed beside the nearest of our cells as
# theirs: RepQ-ViT and ERQ reparameterize the norms, quantize the softmax on a log√2 grid and keep the patch
# embedding and head at 8 bits (our static+repq); PTQ4ViT does none of these (our static).
PAPER = {"FP": ("FP", 85.0, 85.0), "W6A6 static+repq": ("RepQ-ViT W6A6", 58.5, 80.0),
         "W5A5 static+repq": ("RepQ-ViT W5A5", 46.0, 78.0), "W5A5 static": ("PTQ4ViT W5A5", 3.4, 62.0),
         "W4A4 static+repq": ("ERQ W4A4", 65.6, 73.0)}
# QAT: W4A4 with per-tensor static activation scales (`s2d finetune --qat W4A4 --qat-option KEY=VALUE ...`).
QAT_ARMS = ("qat-adamw", "qat-s2d")
QAT_OPTIONS = {"a_static": True, "a_granularity": "per_tensor", "a_observer": "minmax"}
QAT_CELLS = ("W4A4 qat-static", "FP", "W4A4 static")
QAT_LABELS = {"W4A4 qat-static": "QAT W4A4 static (integer model, learned scales)",
              "FP": "QAT: its float weights (FP)", "W4A4 static": "QAT: static PTQ of its float weights"}
PAPER_QAT = {"W4A4 qat-static": ("QAT W4A4", 65.8, 69.7)}
QAT_NOTE = ("QAT arms: `s2d finetune --qat W4A4` with per-tensor static activation scales (min-max) calibrated on the "
            "first training batch, then learned with the weights (LSQ, gradient scaled by 1/sqrt(N·Qp)); each is "
            "scored as its saved integer model (`model-quantized/`, the learned scales), whose forward is the QAT "
            "forward bit for bit. Their FP row is the accuracy of the QAT weights in float, and the gap column is "
            "measured from it.")


def notes(root: Path) -> list[str]:
    """The reading, then the QAT note if any QAT arm has finished (else a line saying none has)."""
    done = any(arm_runs(root, QAT_ARMS, "qat.json").values())
    return [*reading(root), QAT_NOTE if done else "QAT arms: none has finished in this root (the script runs them "
            "last; rerun it to resume them)."]


def qat_args() -> list[str]:
    """The `s2d finetune` flags of the QAT arms."""
    return ["--qat", "W4A4", *[a for k, v in QAT_OPTIONS.items()
                               for a in ("--qat-option", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]]


def quant_config(cell: str):
    """The QuantConfig of a cell name: "<scheme> static[+reparam|+repq][+resid]" (per-tensor static, min-max
    observer; +repq is RepQ-ViT's setting, see CELLS; +resid also quantizes the residual stream at every block's
    output at the activation bits) or "<scheme> dynamic[+resid]" (per-token dynamic, the scheme's defaults);
    per-channel RTN weights throughout."""
    from s2d.quant import QuantConfig

    scheme, kind = cell.split(" ", 1)
    base, *extras = kind.split("+")
    unknown = set(extras) - {"reparam", "repq", "resid"}
    if base not in ("static", "dynamic") or unknown or (base == "dynamic" and set(extras) - {"resid"}):
        raise ValueError(f"not a cell name: {cell!r}")
    a_bits = QuantConfig.from_scheme(scheme).a_bits
    options: dict = {"residual_bits": a_bits} if "resid" in extras else {}
    if base == "dynamic":
        return QuantConfig.from_scheme(scheme, **options)
    options.update(a_static=True, a_granularity="per_tensor", a_observer="minmax")
    if "repq" in extras:
        return QuantConfig.from_scheme(scheme, **options, ln_reparam=True, softmax_bits=a_bits, patch_embed_bits=8,
                                       layer_schemes={"head": "W8A8"})
    return QuantConfig.from_scheme(scheme, **options, ln_reparam="reparam" in extras)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def plan(root: Path) -> dict:
    p = _json(root / "plan.json")
    if p is None:
        raise MissingSetting(f"{root / 'plan.json'} is missing (the script writes it first)")
    return p


def arm_runs(root: Path, arms: tuple[str, ...] = ARMS, file: str = "ptq.json") -> dict[str, dict[int, dict]]:
    """Arm -> seed -> `file` (ptq.json, or qat.json for QAT_ARMS), for the fine-tunes that have one."""
    out: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for arm in arms:
        for p in root.glob(f"{arm}-s[0-9]*"):
            if (p / file).is_file() and p.name.rsplit("-s", 1)[1].isdigit():
                out[arm][int(p.name.rsplit("-s", 1)[1])] = json.loads((p / file).read_text())
    return {arm: dict(sorted(runs.items())) for arm, runs in out.items()}


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan for one value)."""
    from scipy.stats import t

    if len(values) < 2:
        return values[0], float("nan")
    return statistics.mean(values), t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summary(root: Path) -> dict:
    """Per cell: each arm's per-seed accuracies (points), mean and SD; the paired S2D − AdamW differences over the
    seeds both arms finished, with their mean and 95% t half-width; AdamW's mean gap to FP. The QAT arms' cells
    are the same under "qat" (their FP is the QAT weights' own)."""
    return {**_arm_summary(arm_runs(root), ARMS, CELLS),
            "qat": _arm_summary(arm_runs(root, QAT_ARMS, "qat.json"), QAT_ARMS, QAT_CELLS)}


def _arm_summary(runs: dict[str, dict[int, dict]], arms: tuple[str, str], cells_of: tuple[str, ...]) -> dict:
    adamw, s2d = arms  # entries are keyed "ft-adamw"/"ft-s2d" for both pairs, so one table and reading serve both
    paired_seeds = sorted(set(runs[adamw]) & set(runs[s2d]))
    cells: dict[str, dict] = {}
    for cell in cells_of:
        entry: dict = {}
        for arm, key in zip(arms, ARMS, strict=True):
            vals = [100 * r[cell] for r in runs[arm].values() if r.get(cell) is not None]
            entry[key] = {"values": vals, "mean": statistics.mean(vals) if vals else None,
                          "sd": statistics.stdev(vals) if len(vals) > 1 else None}
        diffs = [100 * (runs[s2d][s][cell] - runs[adamw][s][cell]) for s in paired_seeds
                 if runs[s2d][s].get(cell) is not None and runs[adamw][s].get(cell) is not None]
        entry["diffs"] = diffs
        entry["diff"], entry["half"] = t_interval(diffs) if diffs else (None, None)
        gaps = [100 * (r["FP"] - r[cell]) for r in runs[adamw].values() if r.get(cell) is not None]
        entry["adamw_gap"] = statistics.mean(gaps) if gaps else None
        cells[cell] = entry
    return {"seeds": {key: list(runs[arm]) for arm, key in zip(arms, ARMS, strict=True)},
            "paired_seeds": paired_seeds, "cells": cells}


def _pm(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def _ci(diff: float | None, half: float | None) -> str:
    if diff is None:
        return "-"
    if half is None or half != half:
        return f"{diff:+.2f} (one seed)"
    return f"{diff:+.2f} [{diff - half:+.2f}, {diff + half:+.2f}]"


def table(root: Path) -> str:
    """The arm: per cell, each arm's mean ± SD over seeds, the paired difference with its 95% t-interval, AdamW's
    gap to FP, and the paper's numbers (theirs) beside the nearest cell."""
    from s2d.report import md_table

    s = summary(root)
    n = {arm: len(v) for arm, v in s["seeds"].items()}
    rows = []
    qat, q_n = s["qat"], {arm: len(v) for arm, v in s["qat"]["seeds"].items()}
    # The QAT rows follow the PTQ ones when any QAT arm has finished; their seed counts are named if they differ.
    shown = [*((c, c, e, PAPER) for c, e in s["cells"].items()),
             *((QAT_LABELS[c] + ("" if (q_n, len(qat["paired_seeds"])) == (n, len(s["paired_seeds"])) else
                                 f" ({q_n['ft-adamw']}/{q_n['ft-s2d']} seeds, {len(qat['paired_seeds'])} paired)"),
                c, e, PAPER_QAT) for c, e in qat["cells"].items() if any(q_n.values()))]
    for label, cell, e, papers in shown:
        paper = papers.get(cell)
        rows.append([label, _pm(e["ft-adamw"]["mean"], e["ft-adamw"]["sd"]),
                     _pm(e["ft-s2d"]["mean"], e["ft-s2d"]["sd"]),
                     _ci(e["diff"], e["half"]), "-" if cell == "FP" or e["adamw_gap"] is None else
                     f"{e['adamw_gap']:.2f}",
                     f"{paper[0]}: {paper[1]:g} → {paper[2]:g}" if paper else ""])
    return md_table(["cell (test acc, %)", f"AdamW (mean ± SD, {n['ft-adamw']} seeds)",
                     f"AdamW+S2D (mean ± SD, {n['ft-s2d']} seeds)",
                     f"S2D − AdamW [95% t-interval, {len(s['paired_seeds'])} paired seeds]", "AdamW gap to FP",
                     "paper, theirs (SigLIP2-B ImageNet, AdamW → S2D)"], rows)


def pretrain_table(root: Path) -> str:
    """The pre-trainings' final models, one column each (one run, no interval): steps, max |x|, every cell's test
    accuracy and the training time. Transposed, so that CELLS make rows rather than a table too wide to read."""
    from s2d.report import md_table

    runs = {}
    for name, label in PRETRAINS.items():
        p, m = _json(root / name / "ptq.json"), _json(root / name / "metrics.json")
        if p is not None and m is not None:
            runs[f"{name} ({label})"] = (p, m)
    rows = [["steps", *[m["steps"] for p, m in runs.values()]],
            ["residual max |x|", *[p["max_abs"]["residual"] for p, m in runs.values()]],
            ["Linear-input max |x|", *[p["max_abs"]["linear_input"] for p, m in runs.values()]],
            *[[f"{c} (test acc, %)", *[100 * p[c] if c in p else "-" for p, m in runs.values()]] for c in CELLS],
            ["train s", *[round(m["seconds"]) for p, m in runs.values()]]]
    return md_table(["final model", *runs], rows) if runs else ""


def curve(root: Path, name: str) -> list[dict]:
    """curve.json's points in step order (each: step, max_abs, and the CURVE_CELLS accuracies)."""
    c = _json(root / name / "curve.json")
    return sorted(c["points"].values(), key=lambda p: p["step"]) if c else []


def curve_table(root: Path) -> str:
    from s2d.report import md_table

    rows = []
    for name, label in PRETRAINS.items():
        for p in curve(root, name):
            rows.append([label, p["step"], p["max_abs"]["residual"], p["max_abs"]["linear_input"],
                         100 * p["FP"], *[100 * (p["FP"] - p[c]) if c in p else "-" for c in CURVE_CELLS[1:]]])
    return md_table(["pre-training", "step", "residual max |x|", "Linear-input max |x|", "FP acc %",
                     *[f"FP − {c} (points)" for c in CURVE_CELLS[1:]]], rows)


def _beyond(e: dict) -> int:
    """+1 if the paired difference's 95% interval lies above 0, -1 if below, 0 if it holds 0 or there is none."""
    if e["diff"] is None or e["half"] is None or e["half"] != e["half"]:
        return 0
    return 1 if e["diff"] - e["half"] > 0 else -1 if e["diff"] + e["half"] < 0 else 0


def reading(root: Path) -> list[str]:
    """The plain-words answer, generated from the summary: where S2D beats AdamW beyond the interval, by how much,
    at what FP cost, whether the target was reached, then what the pre-trainings show."""
    s = summary(root)
    cells, lines = s["cells"], []
    n = len(s["paired_seeds"])
    if n:
        fp, quantized = cells["FP"], {c: e for c, e in cells.items() if c != "FP" and e["diff"] is not None}
        beats = [c for c, e in quantized.items() if _beyond(e) > 0]
        loses = [c for c, e in quantized.items() if _beyond(e) < 0]
        if n < 2:
            lines.append("One paired seed only: no interval, so no cell can be called beyond it.")
        elif beats:
            lines.append("S2D beats AdamW beyond the 95% interval at " + "; ".join(
                f"{c} by {_ci(quantized[c]['diff'], quantized[c]['half'])} points (AdamW's gap to FP "
                f"{quantized[c]['adamw_gap']:.2f})" for c in beats) + f", over {n} paired seeds. "
                f"{len(quantized)} quantized cells are compared, each at 95%: about "
                f"{0.05 * len(quantized):.1f} would fall beyond their interval by chance alone, so a lone cell is "
                "weak evidence.")
        else:
            lines.append(f"S2D does not beat AdamW beyond the 95% interval at any quantized cell ({n} paired seeds).")
        if loses:
            lines.append("S2D is worse than AdamW beyond the interval at " + "; ".join(
                f"{c} ({_ci(quantized[c]['diff'], quantized[c]['half'])})" for c in loses) + ".")
        adamw, s2d = fp["ft-adamw"], fp["ft-s2d"]
        lines.append(f"The FP cost of S2D: {_ci(fp['diff'], fp['half'])} points (AdamW FP "
                     f"{_pm(adamw['mean'], adamw['sd'])}, S2D {_pm(s2d['mean'], s2d['sd'])}).")
        static = {c: e for c, e in quantized.items() if "static" in c and e["adamw_gap"] is not None}
        big = {c: e for c, e in static.items() if e["adamw_gap"] >= TARGET_GAP}
        hit = [c for c, e in big.items() if e["diff"] >= TARGET_GAIN and _beyond(e) > 0]
        target = (f"Target (S2D ≥ +{TARGET_GAIN:g} points, beyond the interval, at a per-tensor static cell where "
                  f"AdamW loses ≥ {TARGET_GAP:g} points to FP): ")
        if not big:
            largest = max(static.items(), key=lambda ce: ce[1]["adamw_gap"], default=None)
            lines.append(target + "not testable here: no static cell costs AdamW that much"
                         + (f" (largest gap {largest[1]['adamw_gap']:.2f}, {largest[0]})." if largest else ".")
                         + _why_small(root))
        elif hit:
            lines.append(target + "reached at " + ", ".join(
                f"{c} ({_ci(big[c]['diff'], big[c]['half'])}, AdamW gap {big[c]['adamw_gap']:.2f})" for c in hit) + ".")
        else:
            lines.append(target + "not reached; where AdamW loses that much: " + ", ".join(
                f"{c} (gap {e['adamw_gap']:.2f}, S2D − AdamW {_ci(e['diff'], e['half'])})" for c, e in big.items())
                + ".")
        for control, words in (("W4A4 dynamic", "per-token dynamic W4A4"),
                               ("W4A4 dynamic+resid", "per-token dynamic W4A4 with the residual stream quantized")):
            dyn = cells.get(control)
            if dyn and dyn["adamw_gap"] is not None:
                lines.append(f"Control, {words}: AdamW loses {dyn['adamw_gap']:.2f} points to FP; S2D − AdamW "
                             f"{_ci(dyn['diff'], dyn['half'])}.")
    lines += _outlier_words(root)
    lines += _qat_reading(s)
    pre = {name: (_json(root / name / "ptq.json"), _json(root / name / "metrics.json")) for name in PRETRAINS}
    if all(p and m for p, m in pre.values()):
        (pa, ma), (ps, _) = pre["pretrain-long"], pre["pretrain-long-s2d"]
        worst = max([c for c in CELLS if "static" in c and c in pa and c in ps], key=lambda c: pa["FP"] - pa[c])
        lines.append(f"Pre-training with S2D from step 0 against AdamW ({ma['steps']:,} steps each, one run): "
                     f"Linear-input max |x| {pa['max_abs']['linear_input']:.3g} → "
                     f"{ps['max_abs']['linear_input']:.3g}, "
                     f"residual max |x| {pa['max_abs']['residual']:.3g} → {ps['max_abs']['residual']:.3g}; FP "
                     f"{100 * pa['FP']:.2f} → {100 * ps['FP']:.2f}; at AdamW's worst static cell, {worst}, "
                     f"{100 * pa[worst]:.2f} → {100 * ps[worst]:.2f}.")
    for name, label in PRETRAINS.items():
        pts = curve(root, name)
        if len(pts) >= 2:
            a, b = pts[0], pts[-1]
            lines.append(f"{label} pre-training, step {a['step']:,} → {b['step']:,}: Linear-input max |x| "
                         f"{a['max_abs']['linear_input']:.3g} → {b['max_abs']['linear_input']:.3g}; FP − W4A4 static "
                         f"{100 * (a['FP'] - a['W4A4 static']):.2f} → {100 * (b['FP'] - b['W4A4 static']):.2f} points, "
                         f"FP − W6A6 static {100 * (a['FP'] - a['W6A6 static']):.2f} → "
                         f"{100 * (b['FP'] - b['W6A6 static']):.2f}" + _resid_growth(a, b) + ".")
    return lines


def _outlier_words(root: Path) -> list[str]:
    """What S2D did to the outliers the +resid cells quantize: each arm's residual and Linear-input max |x| on the
    calibration images (mean over seeds), and S2D's paired relative change of the residual max."""
    runs = arm_runs(root)
    maxima = {arm: {seed: r["max_abs"] for seed, r in by_seed.items() if "max_abs" in r} for arm, by_seed in
              runs.items()}
    paired = sorted(set(maxima[ARMS[0]]) & set(maxima[ARMS[1]]))
    if not paired:
        return []
    mean = {arm: {k: statistics.mean(maxima[arm][s][k] for s in paired) for k in ("residual", "linear_input")}
            for arm in ARMS}
    change = [100 * (maxima[ARMS[1]][s]["residual"] / maxima[ARMS[0]][s]["residual"] - 1) for s in paired]
    diff, half = t_interval(change)
    spread = {arm: [residual_spread(maxima[arm][s]) for s in paired] for arm in ARMS}
    ratio = "" if any(x is None for xs in spread.values() for x in xs) else (
        "; the residual stream's max / median |x| (mean over the block outputs) "
        + " and ".join(f"{statistics.mean(r for _, r in spread[arm]):.3g}" for arm in ARMS))
    return [f"Outliers the quantizers meet (max |x| on the calibration images, mean over {len(paired)} paired "
            f"seed{'s' if len(paired) > 1 else ''}): residual stream AdamW {mean['ft-adamw']['residual']:.3g}, "
            f"AdamW+S2D {mean['ft-s2d']['residual']:.3g} (S2D's paired change in %: {_ci(diff, half)}); Linear inputs "
            f"{mean['ft-adamw']['linear_input']:.3g} and {mean['ft-s2d']['linear_input']:.3g}{ratio}."]


def residual_spread(max_abs: dict) -> tuple[float, float] | None:
    """The residual stream's median |x| and max |x| / median |x|, each the mean over the blocks' outputs (None if the
    record has no per-block entry). Each block output has its own per-tensor static scale, whose step is its max
    over 2^(b−1)−1: the ratio says how many steps a typical value spans, whatever the stream's overall size."""
    blocks = max_abs.get("blocks")
    if not blocks:
        return None
    return (statistics.mean(b["median"] for b in blocks), statistics.mean(b["max"] / b["median"] for b in blocks))


def _resid_growth(a: dict, b: dict) -> str:
    """The residual-quantized gap at the first and last curve point, where both were measured."""
    cell = "W4A4 static+resid"
    if cell not in a or cell not in b:
        return ""
    return (f"; residual max |x| {a['max_abs']['residual']:.3g} → {b['max_abs']['residual']:.3g}, FP − {cell} "
            f"{100 * (a['FP'] - a[cell]):.2f} → {100 * (b['FP'] - b[cell]):.2f}")


def _why_small(root: Path) -> str:
    """Where pretrain-long's outliers sit: in the residual stream, which only the +resid cells quantize, or in the
    Linears' inputs, whose per-tensor static step they set."""
    p = _json(root / "pretrain-long" / "ptq.json")
    m = None if p is None else p["max_abs"]
    if m is None or "by_role" not in m or m["residual"] <= m["linear_input"]:
        return ""  # no record, or the outliers do reach the Linears: nothing this sentence could say
    roles = ", ".join(f"{r} {v:.3g}" for r, v in sorted(m["by_role"].items(), key=lambda rv: -rv[1]))
    return (f" Why: pretrain-long's outliers stay in the residual stream (max |x| {m['residual']:.3g}), which "
            + ("only the +resid cells quantize" if any("+resid" in c for c in p) else "no quantizer sees")
            + "; every quantized Linear reads a normalized or activated input whose max |x| is "
            f"{m['linear_input']:.3g} at most (by role: {roles}), about {m['residual'] / m['linear_input']:.0f}× "
            "smaller, so the per-tensor static step stays fine even at 4 bits." + _cap_words(m))


def _cap_words(m: dict) -> str:
    """The LayerNorm cap (bench/exp_vit_static.py's norm_caps) against what the Linears behind each norm read, if
    the record has it: a binding cap says width is the lever; a cap far above the inputs says it is not."""
    use = cap_use(m)
    if not use:
        return ""
    said = ", ".join(f"{kind} {seen:.3g} of at most {cap:.3g}" for kind, seen, cap in use)
    binding = bound(use)
    return (f" A LayerNorm's output is at most √(d−1)·max|gain| + max|bias| whatever its input; the Linears behind "
            f"each norm read (by norm): {said}. "
            + ("The cap binds at " + ", ".join(binding) + ": a wider model (a larger d) lifts it." if binding else
               f"No cap binds (every input below {BINDING:.0%} of its cap): the learned gains, not d, keep the "
               "outliers out of the Linears."))


BINDING = 0.8  # an input within 80% of its norm's cap is held by the cap
NORM_READERS = {"attn_in": ("q", "k", "v"), "mlp_in": ("fc1", "gate", "up")}  # the roles each pre-norm feeds


def cap_use(m: dict) -> list[tuple[str, float, float]]:
    """(norm kind, largest input of the Linears it feeds, its cap) for each norm the record has a cap of."""
    caps, roles = m.get("norm_cap") or {}, m.get("by_role") or {}
    out = []
    for kind, cap in sorted(caps.items()):
        seen = [roles[r] for r in NORM_READERS.get(kind, ()) if r in roles]
        if seen:
            out.append((kind, max(seen), cap))
    return out


def bound(use: list[tuple[str, float, float]]) -> list[str]:
    """The norms of cap_use() whose Linears read within BINDING of the cap: where the cap, and so d, holds them."""
    return [kind for kind, seen, cap in use if seen >= BINDING * cap]


def _qat_reading(s: dict) -> list[str]:
    """The QAT arms in plain words: S2D against AdamW after QAT, and QAT against static PTQ of the fine-tunes."""
    q = s["qat"]
    n = len(q["paired_seeds"])
    if not n:
        return []
    e, ptq = q["cells"]["W4A4 qat-static"], s["cells"]["W4A4 static"]
    verdict = {1: "S2D better beyond the 95% interval", -1: "S2D worse beyond the 95% interval",
               0: "no difference beyond the 95% interval" if n > 1 else "one paired seed, no interval"}[_beyond(e)]
    line = (f"QAT W4A4 with learned per-tensor static scales ({n} paired seed{'s' if n > 1 else ''}): AdamW "
            f"{_pm(e['ft-adamw']['mean'], e['ft-adamw']['sd'])}, AdamW+S2D "
            f"{_pm(e['ft-s2d']['mean'], e['ft-s2d']['sd'])}, S2D − AdamW {_ci(e['diff'], e['half'])} ({verdict})")
    if ptq["ft-adamw"]["mean"] is not None and ptq["ft-s2d"]["mean"] is not None:
        line += (f"; static W4A4 PTQ of the plain fine-tunes: AdamW {ptq['ft-adamw']['mean']:.2f}, AdamW+S2D "
                 f"{ptq['ft-s2d']['mean']:.2f}")
    return [line + "."]


def settings(root: Path) -> dict[str, str]:
    """What the text states, read from plan.json, the runs' config.yaml and ptq.json."""
    p = plan(root)
    long = root / "pretrain-long"
    shape = _json(long / "model" / "config.json")
    if shape is None:
        raise MissingSetting(f"{long / 'model' / 'config.json'} is missing (the ViT's shape)")
    fine = [f for f in root.glob("ft-*-s[0-9]*") if (f / "ptq.json").is_file()]
    spe = p["steps_per_epoch"]
    n_tests = sorted({json.loads((f / "ptq.json").read_text())["n_test"]
                      for f in [*fine, *(root / n for n in PRETRAINS)] if (f / "ptq.json").is_file()})
    q = (_json(long / "ptq.json") or {}).get("configs", {}).get("W4A4 static")
    if q is None:
        raise MissingSetting(f"{long / 'ptq.json'} records no W4A4 static config")
    return {"model": setting(long, "model"), "observer": q["a_observer"],
            "grid": "symmetric" if q["a_symmetric"] else "asymmetric",
            "weights": q["w_granularity"].replace("_", "-"), "blocks": str(shape["num_hidden_layers"]),
            "width": str(shape["hidden_size"]), "patch": str(shape["patch_size"]),
            "batch": str(setting(long, "batch_size")), "lr": f"{setting(long, 'lr'):g}",
            "weight_decay": f"{setting(long, 'weight_decay'):g}",
            "epochs": f"{setting(long, 'steps') / spe:g}", "steps": f"{setting(long, 'steps'):,}",
            "ft_lr": " / ".join(sorted({f"{setting(f, 'lr'):g}" for f in fine})) or "-",
            "ft_epochs": " / ".join(sorted({f"{setting(f, 'steps') / spe:g}" for f in fine})) or "-",
            "n_test": " / ".join(f"{n:,}" for n in n_tests), "calib": str(p["calib"]),
            "command": p["command"], "smoke": p["smoke"]}


def intro(s: dict[str, str]) -> str:
    """The settings paragraph, from settings()."""
    return (f"{'SMOKE RUN (tiny sizes, not a result). ' if s['smoke'] else ''}Pre-training: {s['model']} "
            f"({s['blocks']} blocks, d={s['width']}, {s['patch']}×{s['patch']} patches) from its seeded "
            f"initialization, {s['steps']} steps ({s['epochs']} epochs) at peak lr {s['lr']}, weight decay "
            f"{s['weight_decay']}, batch {s['batch']}, once with AdamW (`pretrain-long`) and once with AdamW+S2D from "
            f"step 0 (`pretrain-long-s2d`, same initialization and batches). The arms fine-tune `pretrain-long` for "
            f"{s['ft_epochs']} epoch(s) at lr {s['ft_lr']}, the seed drawing the batches. PTQ: {s['weights']} RTN "
            f"weights; activations per-tensor static ({s['observer']} observer, {s['grid']}, calibrated on the first "
            f"{s['calib']} training images), with and without ln_reparam (RepQ-ViT's norm reparameterization), in "
            "RepQ-ViT's full setting (static+repq: ln_reparam, log√2-quantized attention probabilities at the "
            "activation bits, patch embedding and classifier at W8A8; elsewhere the softmax, patch embedding and "
            "classifier stay in floating point), with the residual stream also quantized at every block's output "
            "(+resid: the fully quantized regime of FQ-ViT, where the stream's outliers set the step), or per-token "
            "dynamic (the control rows, with and without the residual stream quantized). Accuracy on "
            f"{s['n_test']} Fashion-MNIST test images; ± is "
            "the sample SD over seeds, the interval the 95% Student-t interval of the paired per-seed differences.")


def selections(root: Path) -> str:
    """How many Linears S2D decayed at its first and at its last refresh, per S2D run (a run that selected none
    was plain AdamW)."""
    parts = []
    for folder in [root / "pretrain-long-s2d", *sorted(root.glob("ft-s2d-s[0-9]*")),
                   *sorted(root.glob("qat-s2d-s[0-9]*"))]:
        m = _json(folder / "metrics.json")
        refreshes = (m or {}).get("refreshes") or []
        if refreshes:
            parts.append(f"{folder.name} {len(refreshes[0]['selected'])} → {len(refreshes[-1]['selected'])} "
                         f"({len(refreshes)} refresh{'es' if len(refreshes) > 1 else ''})")
    return ("Linears S2D decayed, first → last refresh: " + "; ".join(parts) + ".") if parts else ""


def report(root: Path) -> str:
    """Everything the script prints: the settings, the arm's table, the pre-trainings, the curve and the reading."""
    parts = []
    try:
        s = settings(root)
        parts.append(f"`{s['command']}`")
        parts.append(intro(s))
    except MissingSetting as err:
        parts.append(f"(settings not available: {err})")
    sel = _json(root / "selection.json")
    if sel:
        parts.append(f"S2D option (chosen on pretrain-long before any S2D run): {sel['reg_option']}. "
                     + selections(root))
    parts += ["Fine-tunes of pretrain-long (the QAT rows: the QAT fine-tunes, see the last note):",
              table(root), "Pre-trainings (final models):", pretrain_table(root),
              "Over pre-training (kept checkpoints):", curve_table(root),
              "\n".join(f"- {line}" for line in notes(root))]
    return "\n\n".join(parts)


def figure(root: Path, out: Path) -> Path | None:
    """max |x| (left) and the per-tensor static gap to FP (right) against pre-training steps, both pre-trainings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from s2d.report.figures import save_figure

    curves = {name: curve(root, name) for name in PRETRAINS}
    if not any(curves.values()):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for (name, label), color in zip(PRETRAINS.items(), ("C0", "C3"), strict=True):
        hist = (_json(root / name / "metrics.json") or {}).get("history") or []
        if hist:
            ax1.plot([h["step"] for h in hist], [h["max_abs_act"] for h in hist], color=color, alpha=0.3, lw=0.8,
                     label=f"{label}: residual (training batch)")
        pts = curves[name]
        ax1.plot([p["step"] for p in pts], [p["max_abs"]["linear_input"] for p in pts], color=color, marker="o",
                 label=f"{label}: Linear inputs (calibration images)")
        for cell, style in (("W6A6 static", "--"), ("W4A4 static", "-"), ("W4A4 static+reparam", ":"),
                            ("W4A4 static+resid", "-."), ("W4A4 dynamic+resid", (0, (1, 3)))):
            seen = [p for p in pts if cell in p]
            if seen:
                ax2.plot([p["step"] for p in seen], [100 * (p["FP"] - p[cell]) for p in seen], color=color,
                         ls=style, marker=".", label=f"{label}: {cell}")
    ax1.set(xlabel="pre-training step", ylabel="max |x|", yscale="log", title="Activation outliers")
    ax2.set(xlabel="pre-training step", ylabel="FP − quantized accuracy (points)",
            title="Per-tensor static PTQ gap")
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)
    return save_figure(fig, out)
