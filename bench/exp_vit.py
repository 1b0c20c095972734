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
The table and readings are s2d.experiments.vit's, from the run folders.

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

from s2d.experiments.vit import ARMS, SCHEMES, table

BATCH = 128
# τ is chosen on the long checkpoint, before any fine-tune: the largest of TAUS that selects at least one Linear
# (`selection.json`). A fixed τ could select nothing (at τ 0.95 over all rows a smoke run of this ViT did), making
# S2D plain AdamW.
TAUS = (0.95, 0.9, 0.8, 0.7, 0.5)
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


if __name__ == "__main__":
    main()
