"""The width lever, read back: does a wider pre-training's outliers cost per-tensor static PTQ enough for the ViT arm?

bench/exp_vit_static.py --model scratch:vit-fmnist-wide --pretrain-only trains and measures `pretrain-long` only
(the same schedule family as the deep run, at d=256 instead of 128). A LayerNorm's output is capped at
sqrt(d-1)·max|gain| + max|bias| whatever the residual holds, so at d=128 the residual stream's outliers reach q, k, v
and fc1 at ~11× gain at most; a wider model lifts the cap. Whether that is enough is what this section answers:
the largest static gap to FP along the pre-training, against the arm's ≥ 5-point condition (vit_static.TARGET_GAP).
"""

from __future__ import annotations

import json
from pathlib import Path

from s2d.experiments import vit_static
from s2d.experiments.record import setting

ROOT = "exp-vit-static-wide"


def gaps(point: dict) -> dict[str, float]:
    """FP − each static cell of one measurement (a curve point or a ptq.json), in points."""
    return {c: 100 * (point["FP"] - point[c]) for c in point if c != "FP" and "static" in c
            and isinstance(point[c], float)}


def reading(root: Path) -> list[str]:
    """The plain words: how large the static gap got and where, the Linear inputs against the LayerNorm caps."""
    long = root / "pretrain-long"
    final = vit_static._json(long / "ptq.json")
    points = vit_static.curve(root, "pretrain-long")
    if final is None:
        return []
    g = gaps(final)
    worst = max(g, key=g.get)
    m = final["max_abs"]
    caps = m.get("norm_cap") or {}
    met = g[worst] >= vit_static.TARGET_GAP
    lines = [f"After {setting(long, 'steps'):,} steps: FP {100 * final['FP']:.2f}; the largest per-tensor static gap "
             f"to FP is {g[worst]:.2f} points ({worst}), so the arm's condition (a static cell costing AdamW ≥ "
             f"{vit_static.TARGET_GAP:g} points) is {'met' if met else 'not met'} by this pre-training."]
    if len(points) > 1:
        first, last = points[0], points[-1]
        lines.append(f"Along the pre-training, step {first['step']:,} → {last['step']:,}: residual max |x| "
                     f"{first['max_abs']['residual']:.3g} → {last['max_abs']['residual']:.3g}, Linear-input max |x| "
                     f"{first['max_abs']['linear_input']:.3g} → {last['max_abs']['linear_input']:.3g}, FP − W4A4 "
                     f"static {gaps(first)['W4A4 static']:.2f} → {gaps(last)['W4A4 static']:.2f} points.")
    roles = ", ".join(f"{r} {v:.3g}" for r, v in sorted(m["by_role"].items(), key=lambda rv: -rv[1]))
    lines.append(f"Linear inputs by role: {roles}; residual max |x| {m['residual']:.3g}"
                 + (f"; LayerNorm caps: {', '.join(f'{k} {v:.3g}' for k, v in sorted(caps.items()))}." if caps
                    else "."))
    use = vit_static.cap_use(m)
    if use:
        binding = vit_static.bound(use)
        lines.append("Behind each norm, the largest Linear input against its cap: " + ", ".join(
            f"{kind} {seen:.3g} of {cap:.3g} ({seen / cap:.0%})" for kind, seen, cap in use) + ". "
            + (f"The cap binds at {', '.join(binding)}." if binding else "No cap binds: widening lifted a cap the "
               "inputs were not pressing on, so width is not the lever that brings the outliers into the Linears."))
    return lines


def vision_width(r) -> None:
    """The docs/results.md section (s2d.experiments.results.Results)."""
    root = r.runs / ROOT
    if not (root / "pretrain-long" / "ptq.json").is_file():
        r.missing.append(str(root))
        return
    plan = json.loads((root / "plan.json").read_text())
    shape = json.loads((root / "pretrain-long" / "model" / "config.json").read_text())
    long = root / "pretrain-long"
    r.text("## Experiment 2, per-tensor static: the width lever (a probe of the pre-training only)", True)
    r.quote(f"{plan['command']}   # --table reprints it", True)
    r.text(f"{'SMOKE RUN (tiny sizes, not a result). ' if plan['smoke'] else ''}Pre-training only: {plan['model']} "
           f"({shape['num_hidden_layers']} blocks, d={shape['hidden_size']}, {shape['patch_size']}×"
           f"{shape['patch_size']} patches), {setting(long, 'steps'):,} steps at peak lr {setting(long, 'lr'):g}, "
           f"weight decay {setting(long, 'weight_decay'):g}, batch {setting(long, 'batch_size')}, AdamW; every cell "
           "as in the per-tensor static section above, on the final model and at each kept checkpoint. Why width: "
           "a LayerNorm's output is at most √(d−1)·max|gain| + max|bias| whatever its input, so the residual "
           "stream's outliers reach q, k, v and fc1 capped by d; fc2 reads GELU(fc1), which the cap bounds only "
           "through fc1's weights.", True)
    r.text("\n".join(f"- {line}" for line in reading(root)), True)
    r.text(vit_static.pretrain_table(root))
    r.text("Along the pre-training (max |x| on the calibration images):")
    r.text(vit_static.curve_table(root))
