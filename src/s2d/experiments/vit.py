"""Experiment 2 in miniature, read back: a ViT pre-trained here on Fashion-MNIST, fine-tuned with and without S2D
(bench/exp_vit.py runs the stages).

The root holds `pretrain-short` (one epoch: the script's --steps-per-epoch steps) and `pretrain-long`, the
fine-tunes `<arm>-s<seed>`, each a finetune run folder with ptq.json (FP and PTQ test accuracy) and diagnose/,
and `compare/` and selection.json. Epochs are counted in pretrain-short's steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from s2d.experiments.record import MissingSetting, metrics, shared

# PCDR over the outlier rows (the aggregation that reached SmolLM2's outlier writer); the τ is chosen on the long
# checkpoint before any fine-tune and added by the script (selection.json).
S2D = ["--reg", "s2d", "--reg-option", "form=decoupled", "--reg-option", "lam=0.5", "--reg-option",
       "refresh_every=50", "--reg-option", "pcdr_rows=outliers"]
ARMS = {"ft-adamw": ["--reg", "none"], "ft-s2d": S2D,
        "qat-adamw": ["--reg", "none", "--qat", "W4A4"], "qat-s2d": [*S2D, "--qat", "W4A4"]}
SCHEMES = ("W6A6", "W4A4")
PRETRAINS = ("pretrain-short", "pretrain-long")


def arm_folders(root: Path) -> list[str]:
    """Finished fine-tune folders (arm-s<seed>), in ARMS order, then by seed."""
    names = [p.name for p in root.glob("*-s*") if p.name.rsplit("-s", 1)[0] in ARMS and (p / "ptq.json").is_file()]
    return sorted(names, key=lambda n: (list(ARMS).index(n.rsplit("-s", 1)[0]), n))


def _accuracy(root: Path, name: str, cell: str) -> float | None:
    return json.loads((root / name / "ptq.json").read_text()).get(cell)


def _recorded(path: Path, key: str):
    value = json.loads(path.read_text()).get(key)
    if value is None:
        raise MissingSetting(f"{path} records no {key}")
    return value


def epochs(root: Path, name: str) -> str:
    """How many epochs a run trained, in pretrain-short's steps (one epoch), from their metrics."""
    one = metrics(root / "pretrain-short")
    if one is None:
        raise MissingSetting(f"{root / 'pretrain-short' / 'metrics.json'} is missing (it is the epoch's length)")
    return f"{metrics(root / name)['steps'] / one['steps']:g}"


def settings(root: Path) -> dict[str, str]:
    """What the text states about the runs: the ViT's shape (pretrain-long/model/config.json), the batch, the
    epochs of the pre-trainings and fine-tunes, the test images and the QAT scheme, all read from the runs."""
    models = [n for n in (*PRETRAINS, *arm_folders(root)) if (root / n / "ptq.json").is_file()]
    shape_file = root / "pretrain-long" / "model" / "config.json"
    if not shape_file.is_file():
        raise MissingSetting(f"{shape_file} is missing (the ViT's shape)")
    shape = json.loads(shape_file.read_text())
    fine = arm_folders(root)
    qat = [root / n for n in fine if n.startswith("qat-")]
    return {"blocks": str(shape["num_hidden_layers"]), "width": str(shape["hidden_size"]),
            "patch": str(shape["patch_size"]), "batch": shared([root / n for n in models], "batch_size"),
            "short": epochs(root, "pretrain-short"), "long": epochs(root, "pretrain-long"),
            "fine-tune": " / ".join(sorted({epochs(root, n) for n in fine})) or "-",
            "test": " / ".join(sorted({f"{_recorded(root / n / 'ptq.json', 'n_test'):,}" for n in models})),
            "qat": shared(qat, "qat") if qat else ""}


def reading(root: Path) -> list[str]:
    """Per seed: S2D against AdamW after PTQ (ft arms) and after QAT (qat arms), and the spread over seeds."""
    lines, names = [], set(arm_folders(root))
    compare = root / "compare" / "metrics.json"
    if compare.is_file() and all((root / n / "ptq.json").is_file() for n in PRETRAINS):
        sev = {Path(k).parent.name: v for k, v in json.loads(compare.read_text())["severity"].items()}
        short, long = sev["pretrain-short"], sev["pretrain-long"]
        gap = {n: 100 * (_accuracy(root, n, "FP") - _accuracy(root, n, "W4A4 rtn")) for n in PRETRAINS}
        lines.append(f"Pre-training {epochs(root, 'pretrain-short')} → {epochs(root, 'pretrain-long')} epochs: "
                     f"max |x| ×{long['max_abs'] / short['max_abs']:.1f} "
                     f"({short['max_abs']:.3g} → {long['max_abs']:.3g}), largest σ₁ "
                     f"×{long['sigma1_max'] / short['sigma1_max']:.1f}; the W4A4 RTN accuracy gap goes from "
                     f"{gap['pretrain-short']:.2f} to {gap['pretrain-long']:.2f} points."
                     + (" Outliers grow with pre-training here too, but at this size they do not break per-token "
                        "A4, which leaves S2D little to recover." if gap["pretrain-long"] < 2 else ""))
    seeds = sorted({n.rsplit("-s", 1)[1] for n in names}, key=int)
    for with_s2d, without, cells in (("ft-s2d", "ft-adamw", ("FP", "W6A6 rtn", "W4A4 rtn")),
                                     ("qat-s2d", "qat-adamw", ("W4A4 qat-integer",))):
        diffs = {c: [] for c in cells}
        for seed in seeds:
            a, b = f"{with_s2d}-s{seed}", f"{without}-s{seed}"
            if a in names and b in names:
                for c in cells:
                    diffs[c].append(_accuracy(root, a, c) - _accuracy(root, b, c))
        if diffs[cells[0]]:
            n = len(diffs[cells[0]])
            parts = [f"{c} {sum(d) / n * 100:+.2f} points" + (f" (per seed: {', '.join(f'{x * 100:+.2f}' for x in d)})"
                                                             if n > 1 else "") for c, d in diffs.items()]
            lines.append(f"{with_s2d} − {without}, test accuracy, mean over {n} seed(s): " + "; ".join(parts) + ".")
    return lines


def table(root: Path) -> str:
    from s2d.report import md_table
    from s2d.runs import recorded_threads

    rows = []
    for name in (*PRETRAINS, *arm_folders(root)):
        path = root / name / "ptq.json"
        if not path.is_file():
            continue
        p = json.loads(path.read_text())
        m = json.loads((root / name / "metrics.json").read_text())
        last = m["history"][-1] if m.get("history") else {}
        refreshes = m.get("refreshes") or []
        rows.append([name, m["steps"], p["FP"], *[p[f"{s} rtn"] for s in SCHEMES], p.get("W4A4 qat-integer"),
                     last.get("max_abs_act"), last.get("sigma_max"),
                     len(refreshes[0]["selected"]) if refreshes else None, round(m["seconds"]),
                     recorded_threads(root / name)])
    return md_table(["model", "steps", "FP acc", *[f"{s} RTN acc" for s in SCHEMES], "W4A4 QAT acc (integer model)",
                     "max |x| (last batch)", "σ₁ max", "S2D layers selected (step 0)", "train s", "threads"], rows)


def figures(root: Path, out: Path) -> list[tuple[str, str]]:
    """Per-block max|x| by model, σ₁ over the fine-tunes' steps, and the W4A4 gap; returns (file, caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from s2d.report.figures import save_figure

    models = [n for n in (*PRETRAINS, *arm_folders(root)) if (root / n / "diagnose" / "metrics.json").is_file()]
    out.mkdir(parents=True, exist_ok=True)
    made = []
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for name in models:
        res = json.loads((root / name / "diagnose" / "metrics.json").read_text())["residual"]
        ax.plot([r["block"] for r in res], [r["max_abs"] for r in res], marker=".", label=name)
    ax.set(xlabel="block", ylabel="residual max |x|", title="ViT: max |x| per block, by model")
    ax.legend(fontsize=7)
    made.append((save_figure(fig, out / "exp-vit-max.png").name, "ViT residual-stream max |x| per block, by model"))

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for name in arm_folders(root):
        hist = json.loads((root / name / "metrics.json").read_text()).get("history") or []
        ax.plot([h["step"] for h in hist], [h["sigma_max"] for h in hist], label=name)
    ax.set(xlabel="fine-tune step", ylabel="largest σ₁ over all Linears", title="ViT: σ₁ over fine-tuning steps")
    ax.legend(fontsize=7)
    made.append((save_figure(fig, out / "exp-vit-sigma.png").name, "Largest σ₁ of the ViT's Linears over steps"))

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    names = [n for n in ("pretrain-long", *arm_folders(root)) if (root / n / "ptq.json").is_file()]
    for i, cell in enumerate(("W6A6 rtn", "W4A4 rtn", "W4A4 qat-integer")):
        gaps = [100 * (_accuracy(root, n, "FP") - (_accuracy(root, n, cell) or float("nan"))) for n in names]
        ax.bar([j + 0.27 * (i - 1) for j in range(len(names))], gaps, width=0.27, label=cell)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="FP acc − quantized acc (points)", title="The quantization gap, by model")
    ax.legend(fontsize=7)
    made.append((save_figure(fig, out / "exp-vit-gap.png").name, "ViT: accuracy lost to W6A6/W4A4 PTQ and W4A4 QAT"))
    return made
