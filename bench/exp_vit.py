"""Experiment 2 in miniature: a small ViT pre-trained here on Fashion-MNIST, then fine-tuned with and without S2D.

Stages, each one command writing its own run folder under --root (a folder with metrics.json is skipped, and
`s2d finetune` resumes from its checkpoints, so the script resumes where it stopped):
1. `pretrain-short` (1 epoch) and `pretrain-long` (--epochs) from the same seeded random ViT;
2. `compare`: `s2d compare short long`, the miniature of "outliers grow with pre-training";
3. fine-tunes of the long checkpoint under a changed regime (a new, higher learning rate, one epoch):
   `ft-adamw`, `ft-s2d`, and the same two with W4A4 QAT (`qat-adamw`, `qat-s2d`);
4. `ptq.json` in every model's folder: test accuracy (--n-test images, all 10,000 by default) of the FP model and of RTN
   W4A4 / W6A6 PTQ (per-channel weights, per-token activations), through `s2d.quant.quantize`; for the QAT
   arms, the accuracy of the saved integer model (`model-quantized/`) is added.

Usage: python bench/exp_vit.py [--root runs/exp-vit] [--epochs 20] [--ft-lr 3e-4] [--seed 0] [--table]
       (--seed draws the fine-tunes' batches; arm folders end in -s<seed>; the pre-training always uses seed 0)
       [--steps-per-epoch 469]  (lower it, with --epochs, for a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

BATCH = 128
# PCDR over the outlier rows (the aggregation that reached SmolLM2's outlier writer). τ is chosen on the long
# checkpoint, before any fine-tune: the largest of TAUS that selects at least one Linear (`selection.json`). A
# fixed τ could select nothing (at τ 0.95 over all rows a smoke run of this ViT did), making S2D plain AdamW.
S2D = ["--reg", "s2d", "--reg-option", "form=decoupled", "--reg-option", "lam=0.5", "--reg-option",
       "refresh_every=50", "--reg-option", "pcdr_rows=outliers"]
TAUS = (0.95, 0.9, 0.8, 0.7, 0.5)
ARMS = {"ft-adamw": ["--reg", "none"], "ft-s2d": S2D,
        "qat-adamw": ["--reg", "none", "--qat", "W4A4"], "qat-s2d": [*S2D, "--qat", "W4A4"]}
SCHEMES = ("W6A6", "W4A4")
PRETRAIN_SEED = 0


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with log.open("a") as f:
        subprocess.run([str(Path(sys.executable).with_name("s2d")), *cmd[1:]], check=True, stdout=f,
                       stderr=subprocess.STDOUT)


def finetune(model: str, steps: int, lr: float, warmup: int, seed: int, out: Path, extra: list[str]) -> list[str]:
    return ["s2d", "finetune", model, "--task", "image", "--image-data", "fashion-mnist", "--steps", str(steps),
            "--batch-size", str(BATCH), "--lr", str(lr), "--warmup", str(warmup), "--seed", str(seed),
            "--eval-every", "0", "--checkpoint-every", str(max(1, steps // 4)), *extra, "--resume", "--out", str(out)]


@torch.no_grad()
def ptq(folder: Path, n_test: int) -> dict:
    """FP and RTN-PTQ test accuracy of folder/model (and of folder/model-quantized, if QAT saved one)."""
    from s2d.assets import load_fashion_mnist, load_model, pixel_values
    from s2d.eval import classification_accuracy
    from s2d.quant import QuantConfig, quantize

    model, _ = load_model(str(folder / "model"))
    model.eval()
    images, labels = load_fashion_mnist("test")
    images, labels = images[:n_test], labels[:n_test]
    cfg = model.config
    batch = {"pixel_values": pixel_values(images.float() / 255, int(cfg.image_size), int(cfg.num_channels)),
             "labels": labels}
    out = {"n_test": len(labels), "FP": classification_accuracy(model, batch)}
    for scheme in SCHEMES:
        q = quantize(copy.deepcopy(model), QuantConfig.from_scheme(scheme), progress=False)
        out[f"{scheme} rtn"] = classification_accuracy(q, batch)
    if (folder / "model-quantized").is_dir():
        qat, _ = load_model(str(folder / "model-quantized"))
        out["W4A4 qat-integer"] = classification_accuracy(qat.eval(), batch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/exp-vit"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps-per-epoch", type=int, default=469)  # 60,000 images / batch 128
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--n-test", type=int, default=10000, help="test images for accuracy (all 10,000 by default)")
    ap.add_argument("--table", action="store_true", help="only print the table of finished stages")
    args = ap.parse_args()
    root, spe = args.root, args.steps_per_epoch
    root.mkdir(parents=True, exist_ok=True)
    stages = {"pretrain-short": finetune("scratch:vit-fmnist", spe, args.lr, min(200, spe // 2), PRETRAIN_SEED,
                                         root / "pretrain-short", ["--reg", "none"]),
              "pretrain-long": finetune("scratch:vit-fmnist", spe * args.epochs, args.lr, 200, PRETRAIN_SEED,
                                        root / "pretrain-long", ["--reg", "none"])}
    stages["compare"] = ["s2d", "compare", str(root / "pretrain-short" / "model"),
                         str(root / "pretrain-long" / "model"), "--data", "fashion-mnist", "--overwrite", "--out",
                         str(root / "compare")]
    if not args.table:
        run_stages(stages, root, args.n_test)
        option = select_tau(root)["reg_option"]
        fine_tunes = {}
        for name in args.arms:  # the pre-training is shared; --seed draws the fine-tune's batches (and QAT's init)
            extra = [*ARMS[name], "--reg-option", option] if "s2d" in name else ARMS[name]
            fine_tunes[f"{name}-s{args.seed}"] = finetune(str(root / "pretrain-long" / "model"), spe, args.ft_lr,
                                                          spe // 10, args.seed, root / f"{name}-s{args.seed}", extra)
        run_stages(fine_tunes, root, args.n_test)
    print(table(root))


def run_stages(stages: dict[str, list[str]], root: Path, n_test: int) -> None:
    """Each stage, then for every model its PTQ accuracies and its per-block outliers (`s2d diagnose`)."""
    for name, cmd in stages.items():
        if not (root / name / "metrics.json").is_file():
            run(cmd, root / "log.txt")
        if name == "compare":
            continue
        if not (root / name / "ptq.json").is_file():
            (root / name / "ptq.json").write_text(json.dumps(ptq(root / name, n_test), indent=1))
        if not (root / name / "diagnose" / "metrics.json").is_file():
            run(["s2d", "diagnose", str(root / name / "model"), "--data", "fashion-mnist", "--overwrite", "--out",
                 str(root / name / "diagnose")], root / "log.txt")


@torch.no_grad()
def select_tau(root: Path) -> dict:
    """The Linears S2D would select on the long checkpoint at each τ (one training batch, outlier-row PCDR), and
    the largest τ that selects any (else the "all" selection); computed once and kept in selection.json."""
    from s2d.assets import load_fashion_mnist, load_model, pixel_values
    from s2d.io import atomic_write_json
    from s2d.regularize import S2DConfig, SelectiveSpectralDecay

    path = root / "selection.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, _ = load_model(str(root / "pretrain-long" / "model"))
    model.eval()
    images, _ = load_fashion_mnist("train")
    cfg = model.config
    batch = pixel_values(images[:BATCH].float() / 255, int(cfg.image_size), int(cfg.num_channels))
    selected = {}
    for tau in TAUS:
        reg = SelectiveSpectralDecay(model, S2DConfig(tau=tau, pcdr_rows="outliers"))
        model(pixel_values=batch)
        record = reg.refresh()
        reg.remove()
        selected[str(tau)] = sorted(n for n, r in record["layers"].items() if r["k_target"])
    pcdr = [r["pcdr"][0] for r in record["layers"].values() if r.get("pcdr")]
    tau = next((t for t in TAUS if selected[str(t)]), None)
    # No τ selects anything: decay the top components of every Linear instead (S2D's "all" selection), so the
    # S2D arm still differs from AdamW; the table says which rule ran.
    out = {"selected": selected, "tau": tau, "reg_option": f"tau={tau}" if tau else "selection=all",
           "max_pcdr1": max(pcdr, default=None)}
    atomic_write_json(path, out)
    return out


def arm_folders(root: Path) -> list[str]:
    """Finished fine-tune folders (arm-s<seed>), in ARMS order, then by seed."""
    names = [p.name for p in root.glob("*-s*") if p.name.rsplit("-s", 1)[0] in ARMS and (p / "ptq.json").is_file()]
    return sorted(names, key=lambda n: (list(ARMS).index(n.rsplit("-s", 1)[0]), n))


def _accuracy(root: Path, name: str, cell: str) -> float | None:
    return json.loads((root / name / "ptq.json").read_text()).get(cell)


def reading(root: Path) -> list[str]:
    """Per seed: S2D against AdamW after PTQ (ft arms) and after QAT (qat arms), and the spread over seeds."""
    lines, names = [], set(arm_folders(root))
    compare = root / "compare" / "metrics.json"
    if compare.is_file() and all((root / n / "ptq.json").is_file() for n in ("pretrain-short", "pretrain-long")):
        sev = {Path(k).parent.name: v for k, v in json.loads(compare.read_text())["severity"].items()}
        short, long = sev["pretrain-short"], sev["pretrain-long"]
        gap = {n: 100 * (_accuracy(root, n, "FP") - _accuracy(root, n, "W4A4 rtn"))
               for n in ("pretrain-short", "pretrain-long")}
        lines.append(f"Pre-training 1 → 20 epochs: max |x| ×{long['max_abs'] / short['max_abs']:.1f} "
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
    for name in ("pretrain-short", "pretrain-long", *arm_folders(root)):
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

    models = [n for n in ("pretrain-short", "pretrain-long", *arm_folders(root))
              if (root / n / "diagnose" / "metrics.json").is_file()]
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


if __name__ == "__main__":
    main()
