"""SmolLM2 where the max sets the scale: per-tensor activations (W8A8 as SmoothQuant's O1–O3 and without smoothing,
W6A6), each beside its per-token control, and W4A4 with the `best` recipe, for AdamW and the headline S2D arm
(bench/smollm2_per_tensor.py runs it).

S2D shrinks the few massive tokens; a per-token scale never sees them in the other tokens' rows, a per-tensor scale
is set by them. So S2D − AdamW at a per-tensor cell, against the same change at its per-token control, shows where
S2D's effect can appear. A root holds one folder per model, `start` (the packaged model) and
`<arm>-steps<N>-s<seed>` (its fine-tune in `finetune/`), each with `cells/<cell>.json` (one per cell, FP included)
and `residual.json`. Everything here reads those files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from s2d.experiments.smollm2 import HEADLINE

ADAMW = "adamw"
SMOOTH = 0.5  # SmoothQuant's α for O1–O3 (the paper's default; the issue asks for it)
NOISE = 0.05  # a relative change within ±5% is read as no clear change (AdamW's seed spread is a few percent)
BROKEN = 10.0  # a cell at ≥ 10× FP perplexity is broken for both arms: a change there says little


@dataclass(frozen=True)
class Cell:
    """One quantized setting: weights RTN at `w` granularity (or a named recipe), activations `a`, static or
    dynamic, SmoothQuant α or none; `control` is the per-token cell with everything else the same."""

    scheme: str
    w: str = "per_channel"
    a: str = "per_token"
    static: bool = False
    smooth: float | None = None
    recipe: str | None = None
    control: str | None = None

    def config(self, seed: int = 0):
        from s2d.quant.config import QuantConfig

        if self.recipe is not None:
            from s2d.quant.recipes import recipe_fields

            return QuantConfig.from_scheme(self.scheme, **recipe_fields(self.recipe, kv=False), seed=seed)
        return QuantConfig.from_scheme(self.scheme, method="rtn", w_granularity=self.w, a_granularity=self.a,
                                       a_static=self.static, smooth_alpha=self.smooth, seed=seed)


# SmoothQuant (Xiao et al. 2023, Table 2): O1 = per-tensor weights + per-token dynamic activations, O2 = per-tensor
# weights + per-tensor dynamic, O3 = per-tensor weights + per-tensor static; its plain W8A8 baseline is O2 without
# smoothing. W6A6 keeps this repo's per-channel weights, so that its activations are the one thing varied (and its
# per-token cell is the experiment's own "W6A6 rtn").
_W8 = {"w": "per_tensor"}
CELLS: dict[str, Cell] = {
    "W8A8 O1": Cell("W8A8", **_W8, smooth=SMOOTH),
    "W8A8 O2": Cell("W8A8", **_W8, a="per_tensor", smooth=SMOOTH, control="W8A8 O1"),
    "W8A8 O3": Cell("W8A8", **_W8, a="per_tensor", static=True, smooth=SMOOTH, control="W8A8 O1"),
    "W8A8 per-token": Cell("W8A8", **_W8),
    "W8A8 per-tensor dynamic": Cell("W8A8", **_W8, a="per_tensor", control="W8A8 per-token"),
    "W8A8 per-tensor static": Cell("W8A8", **_W8, a="per_tensor", static=True, control="W8A8 per-token"),
    "W6A6 per-token": Cell("W6A6"),
    "W6A6 per-tensor dynamic": Cell("W6A6", a="per_tensor", control="W6A6 per-token"),
    "W6A6 per-tensor static": Cell("W6A6", a="per_tensor", static=True, control="W6A6 per-token"),
    "W6A6 smooth per-token": Cell("W6A6", smooth=SMOOTH),
    "W6A6 smooth per-tensor dynamic": Cell("W6A6", a="per_tensor", smooth=SMOOTH, control="W6A6 smooth per-token"),
    "W6A6 smooth per-tensor static": Cell("W6A6", a="per_tensor", static=True, smooth=SMOOTH,
                                          control="W6A6 smooth per-token"),
    "W4A4 best": Cell("W4A4", recipe="best"),
}
BEST = "W4A4 best"


def cell_file(name: str) -> str:
    return name.replace(" ", "_") + ".json"


def model_name(arm: str, steps: int, seed: int) -> str:
    return f"{arm}-steps{steps}-s{seed}"


def _parse(name: str) -> tuple[str, int, int] | None:
    """(arm, steps, seed) of a fine-tuned model's folder name; None for `start` or a foreign folder."""
    head, _, seed = name.rpartition("-s")
    arm, _, steps = head.rpartition("-steps")
    return (arm, int(steps), int(seed)) if arm and steps.isdigit() and seed.isdigit() else None


def result(folder: Path, cell: str) -> dict | None:
    path = folder / "cells" / cell_file(cell)
    return json.loads(path.read_text()) if path.is_file() else None


def ppl(folder: Path, cell: str) -> float | None:
    """The cell's perplexity; None while it has not run, or when it overflowed (its JSON says why)."""
    res = result(folder, cell)
    return res.get("ppl") if res else None


def models(root: Path) -> dict[str, Path]:
    """Model folders with an FP result: `start` first, then by steps, AdamW before S2D."""
    found = [p for p in sorted(root.iterdir()) if (p / "cells" / cell_file("FP")).is_file()] if root.is_dir() else []

    def order(p: Path):
        parsed = _parse(p.name)
        return (0, 0, 0, "") if parsed is None else (1, parsed[1], parsed[2], parsed[0] != ADAMW, parsed[0])
    return {p.name: p for p in sorted(found, key=order)}


def pairs(root: Path) -> list[tuple[int, int, Path, Path]]:
    """(steps, seed, AdamW folder, S2D folder) for every steps/seed both arms finished."""
    done = models(root)
    out = []
    for name, folder in done.items():
        parsed = _parse(name)
        if parsed and parsed[0] == ADAMW and (s2d := done.get(model_name(HEADLINE, parsed[1], parsed[2]))):
            out.append((parsed[1], parsed[2], folder, s2d))
    return out


def change(s2d: Path, adamw: Path, cell: str) -> float | None:
    """S2D − AdamW as a relative change of perplexity (below 0: S2D is better)."""
    a, b = ppl(s2d, cell), ppl(adamw, cell)
    return None if a is None or b is None else a / b - 1


def residual(folder: Path) -> dict | None:
    path = folder / "residual.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _shown(folder: Path, cell: str) -> str:
    from s2d.report.markdown import fmt

    res = result(folder, cell)
    if res is None:
        return "-"
    if res.get("ppl") is None:
        return "NaN/Inf"
    fp = ppl(folder, "FP")
    return fmt(res["ppl"]) if cell == "FP" or not fp else f"{fmt(res['ppl'])} ({res['ppl'] / fp:.2f}×)"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _words(cell: str) -> list[str]:
    """Activations, weights, SmoothQuant α and control of a cell, as the table states them (from its config)."""
    c, q = CELLS[cell], CELLS[cell].config()
    acts = f"per-token groups of {q.a_group_size}" if q.a_granularity == "per_group" else \
        q.a_granularity.replace("_", "-") + (" static" if q.a_static else " dynamic")
    weights = f"recipe `{c.recipe}`" if c.recipe else f"{q.w_granularity.replace('_', '-')} {q.method.upper()}"
    return [acts, weights, "-" if q.smooth_alpha is None else f"{q.smooth_alpha:g}", c.control or "-"]


def table(root: Path) -> str:
    """Rows = cells (FP first), columns = each model's perplexity (× its FP) and S2D − AdamW per steps; then each
    model's residual max |x|."""
    from s2d.report import md_table

    done, pa = models(root), pairs(root)
    head = ["cell", "activations", "weights", "SmoothQuant α", "per-token control", *done,
            *[f"S2D − AdamW, {steps} steps (s{seed})" for steps, seed, _, _ in pa]]
    rows = [["FP", "-", "-", "-", "-", *[_shown(f, "FP") for f in done.values()],
             *[_pct(change(s, a, "FP")) for _, _, a, s in pa]]]
    for cell in CELLS:
        if not any(result(f, cell) for f in done.values()):
            continue
        rows.append([cell, *_words(cell), *[_shown(f, cell) for f in done.values()],
                     *[_pct(change(s, a, cell)) for _, _, a, s in pa]])
    res = {n: residual(f) for n, f in done.items()}
    adamw = {(st, sd): a for st, sd, a, _ in pa}
    peaks = []
    for name, folder in done.items():
        r, parsed = res[name], _parse(name)
        base = adamw.get(parsed[1:]) if parsed else None
        rb = residual(base) if base is not None and base != folder else None
        peaks.append([name, "-" if parsed is None else parsed[1], "-" if r is None else f"{r['max_abs']:.4g}",
                      "-" if r is None else ", ".join(map(str, r["loudest_positions"])),
                      "-" if r is None else f"{r['max_abs_elsewhere']:.4g}",
                      "-" if r is None or rb is None else _pct(r["max_abs"] / rb["max_abs"] - 1)])
    return "\n\n".join([md_table(head, rows), md_table(
        ["model", "steps", "residual max |x|", "loudest positions", "max |x| at the other positions",
         "against AdamW"], peaks)])


def _listed(items: list[str]) -> str:
    return "; ".join(items) if items else "none"


def reading(root: Path) -> list[str]:
    """In plain words, per steps: where S2D beats AdamW at a per-tensor cell and by how much, against the same
    change at the per-token control, and whether S2D adds anything on top of `best`."""
    lines = []
    for steps, seed, adamw, s2d in pairs(root):
        where = f"At {steps} steps (seed {seed})"
        ra, rs = residual(adamw), residual(s2d)
        if ra and rs:
            lines.append(f"{where}, S2D's residual max |x| is {rs['max_abs']:.4g} against AdamW's {ra['max_abs']:.4g} "
                         f"({rs['max_abs'] / ra['max_abs'] - 1:+.0%}); FP perplexity {_pct(change(s2d, adamw, 'FP'))}.")
        better, worse, beyond, broken = [], [], [], []
        for cell, c in CELLS.items():
            ch = change(s2d, adamw, cell)
            if c.a != "per_tensor" or ch is None:
                continue
            ctl = change(s2d, adamw, c.control)
            said = f"{cell} {ch:+.1%} (per-token control {_pct(ctl)})"
            if ch:  # an unchanged cell is neither
                (better if ch < 0 else worse).append(said)
            if ctl is not None and ch < ctl - NOISE:
                beyond.append(f"{cell} by {(ctl - ch) * 100:.1f} points")
            fp = ppl(adamw, "FP")
            if fp and ppl(adamw, cell) is not None and ppl(adamw, cell) / fp >= BROKEN:
                broken.append(cell)
        n = sum(c.a == "per_tensor" and change(s2d, adamw, name) is not None for name, c in CELLS.items())
        if not n:
            continue
        lines.append(f"{where}, S2D has lower perplexity than AdamW in {len(better)} of {n} per-tensor cells: "
                     f"{_listed(better)}. Higher in {len(worse)}: {_listed(worse)}.")
        lines.append(f"{where}, S2D's change at a per-tensor cell is better than at its per-token control by more "
                     f"than {NOISE * 100:.0f} points (what a max-set scale exposes and a per-token one cannot) in "
                     f"{len(beyond)} of {n}: {_listed(beyond)}."
                     + (f" AdamW itself is at ≥ {BROKEN:g}× its FP perplexity (broken) in {_listed(broken)}, where a "
                        "change says little." if broken else ""))
    for steps, seed, adamw, s2d in pairs(root):
        ch = change(s2d, adamw, BEST)
        if ch is None:
            continue
        verdict = "S2D adds to the working stack" if ch < -NOISE else "S2D costs the working stack" \
            if ch > NOISE else f"no clear change (within ±{NOISE:.0%})"
        lines.append(f"On top of `best` W4A4 at {steps} steps (seed {seed}): {ppl(s2d, BEST):.4g} against AdamW's "
                     f"{ppl(adamw, BEST):.4g} ({ch:+.1%}): {verdict}.")
    return lines


def settings(root: Path) -> dict[str, str]:
    """What the cells ran with, read from their JSON: perplexity window and tokens, calibration; and the
    fine-tunes' steps and lr (finetune/config.yaml). A setting that differs between files reads as all its values."""
    from s2d.experiments.record import MissingSetting, hyper, shared

    done = models(root)
    recs = [r for f in done.values() for c in ("FP", *CELLS) if (r := result(f, c))]
    if not recs:
        raise MissingSetting(f"{root} has no measured cell")

    def said(key, show=str):
        return " / ".join(show(v) for v in sorted({key(r) for r in recs}))
    tuned = [f / "finetune" for f in done.values() if (f / "finetune" / "config.yaml").is_file()]
    return {"window": said(lambda r: r["eval_config"]["seq_lens"][0]),
            "tokens": said(lambda r: r["eval_config"]["ppl_tokens"], "{:,}".format),
            "calibration": said(lambda r: f"{r['calibration']['n_samples']}×{r['calibration']['seq_len']}"),
            "start": said(lambda r: r["start_model"]),
            "steps": shared(tuned, "steps") if tuned else "-", "lr": shared(tuned, "lr", hyper) if tuned else "-"}


def smollm2_per_tensor(r) -> None:
    """The docs/results.md section (s2d.experiments.results.Results): command, settings, table, reading."""
    root = r.runs / "smollm2-per-tensor"
    if not models(root):
        r.missing.append(str(root))
        return
    s = settings(root)
    r.text("## SmolLM2 with per-tensor activations: where S2D's smaller max can pay", True)
    r.quote("python bench/smollm2_per_tensor.py   # --table reprints the table", True)
    r.text(f"Every model is `{s['start']}` (`start`) or fine-tuned from it by `bench/exp_smollm2_s2d.py`'s finetune "
           f"command ({s['steps']} steps, lr {s['lr']}): `adamw` and `{HEADLINE}`. Each cell quantizes the model "
           f"with the s2d API (calibration {s['calibration']} wiki-train tokens) and scores wiki-test "
           f"ppl@{s['window']} on the first {s['tokens']} tokens. SmoothQuant's levels (Xiao et al. 2023, Table 2): "
           "O1 = per-tensor weights and per-token dynamic activations, O2 = per-tensor dynamic, O3 = per-tensor "
           f"static, all with SmoothQuant α {SMOOTH:g}; the unsmoothed W8A8 rows are the same without it. Each "
           "per-tensor row names its per-token control (the same row with per-token activations): S2D − AdamW there "
           "is what S2D does where a few tokens' size costs nothing. The residual max |x| is over every block's "
           "output on the FP model's perplexity windows, per token position.", True)
    r.text(table(root), True)
    r.text("\n".join(f"- {line}" for line in reading(root)), True)
