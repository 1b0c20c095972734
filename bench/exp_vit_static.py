"""The ViT arm in the per-tensor static regime: a deeper ViT pre-trained (with and without S2D) until its outliers
cost per-tensor static PTQ accuracy, then AdamW against AdamW+S2D fine-tunes over seeds (issue 21, items 2-4, 6).

Why this pre-training. S2D cuts the largest activations, which only matters where the largest activation sets the
step for every token: per-tensor static activation scales. bench/exp_vit.py's ViT (6 blocks, d=128, 20 epochs at
lr 1e-3) reached max |x| 31 and lost 0.4 points at per-token W4A4: nothing to recover. Here the same seeded scratch
family is made deeper and trained harder, the three levers the outlier literature ties to outlier growth at no
change of data: depth (`scratch:vit-fmnist-deep`, 12 blocks instead of 6 at the same d=128: massive activations
appear after the first blocks and grow with depth, Sun et al. 2024), a 2× higher peak learning rate (2e-3; outlier
features grow with the learning rate, He et al. 2024), and a longer schedule (30 epochs instead of 20; outliers grow
with training, Bondarenko et al. 2023, whose ViT outliers sit on no-op attention to background patches, which
Fashion-MNIST's blank borders supply), with no weight decay (decay holds weights, and so outliers, down). The
16-token patching is kept, so a step costs about 2× the 6-block model's. This run's residual outliers (max |x|
~100) never reached the quantized Linears (≤ 12.7). A LayerNorm's output is at most sqrt(d-1)·max|gain| + max|bias|
whatever its input (norm_caps, recorded with every max |x|), so width was the next lever: `--model
scratch:vit-fmnist-wide` (d=256) lifts the cap, and `--pretrain-only` measures one pre-training before the arms are
spent on it (s2d.experiments.vit_width reads it; whether the inputs then press on the cap is in its reading).

Stages (each writes its own folder under --root; a folder with metrics.json is not trained again and one with
ptq.json / curve.json is not measured again, except that each gains the cells it lacks; `s2d finetune --resume`
continues from the last checkpoint):
1. `pretrain-long`: `s2d finetune scratch:vit-fmnist-deep` with AdamW, keeping every checkpoint
   (--curve-points of them, via `pretrain.yaml`'s keep_checkpoints); `curve.json` measures each kept checkpoint:
   max |x| of the residual stream and of the quantized Linears' inputs on the calibration images, and FP and
   per-tensor static W6A6 / W4A4 accuracy, with and without ln_reparam;
2. `selection.json`: S2D's τ chosen on `pretrain-long` (bench/exp_vit.py's select_tau);
3. `pretrain-long-s2d`: the same pre-training (same init, same batches) with `--reg s2d` from step 0, the same
   measurements;
4. `ft-adamw-s<seed>`, `ft-s2d-s<seed>`: fine-tunes of `pretrain-long` (one epoch at --ft-lr, bench/exp_vit.py's
   recipe and S2D options);
5. `ptq.json` in every model's folder: FP, and W8A8 / W6A6 / W5A5 / W4A4 with per-tensor static activation scales
   (min-max observer, calibrated on the first 32 training images) with and without ln_reparam, and in RepQ-ViT's
   full setting (static+repq: also log√2 softmax at the activation bits, patch embedding and classifier at W8A8),
   with the residual stream also quantized at every block's output (+resid, s2d.quant.residual: the fully
   quantized regime, where the stream's outliers, not the LayerNorm-capped Linear inputs, set the step), and
   per-token dynamic W4A4 with and without the residual stream as the controls (s2d.experiments.vit_static.CELLS);
   a ptq.json or curve.json point lacking some cells (written before they existed) gets those measured and merged
   in;
6. `qat-adamw-s<seed>`, `qat-s2d-s<seed>`: the ft-* fine-tunes (same steps, lr and seed) with W4A4 QAT at
   per-tensor static activation scales (vit_static.QAT_OPTIONS: min-max calibrated on the first training batch,
   then learned by LSQ), run after every other stage; `qat.json` in each holds the test accuracy of the saved
   integer model (`model-quantized/`, the learned scales: the QAT forward bit for bit), of its float weights, and
   of static W4A4 PTQ of those weights (scales calibrated afresh), vit_static.QAT_CELLS.
7. `lever-<name>-s<seed>` (only with --levers): the ft-s2d fine-tune with some S2D options changed
   (s2d.experiments.vit_levers.LEVERS: a larger λ, S2D kept to the residual stream's writers, PCDR's selection off),
   each with a ptq.json of vit_levers.LEVER_CELLS. `--levers-only` runs just the two arms' fine-tunes and the
   levers after `pretrain-long`, seed by seed, all measured on LEVER_CELLS (a later full run adds the arms' other
   cells).
The table, the plain-words answer and the figure are s2d.experiments.vit_static's (vit_levers' for the levers),
read from the run folders.

Usage: python bench/exp_vit_static.py [--root runs/exp-vit-static] [--epochs 30] [--lr 2e-3] [--seeds 0 1 2]
           [--n-test 10000] [--jobs 1] [--model scratch:vit-fmnist-deep] [--pretrain-only] [--table] [--smoke]
           [--levers NAME ...] [--levers-only]
       --smoke runs every stage at a tiny size (runs/exp-vit-static-smoke) to check the pipeline in minutes.
Cost on one core per process: ~0.5 s per pre-training step (AdamW or S2D), ~0.8 s per QAT step, ~7 s per
measured cell on 5,000 test images (a ptq.json's 14 cells: ~110 s). The full default run is ~8 h on one core;
docs/results.md's run is
`OMP_NUM_THREADS=1 python bench/exp_vit_static.py --epochs 10 --n-test 5000 --curve-points 6 --jobs 2`, which
took about 1 h 45 min on two cores (the first pre-training alone, then the rest two at a time).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import sys
import time
from pathlib import Path

import torch
from exp_vit import BATCH, PRETRAIN_SEED, finetune, run, select_tau

from s2d.assets.tiny import SCRATCH_MODELS
from s2d.experiments import vit_levers
from s2d.experiments.vit import S2D
from s2d.experiments.vit_levers import LEVER_CELLS, LEVERS, s2d_flags
from s2d.experiments.vit_static import ARMS, CALIB, CELLS, CURVE_CELLS, QAT_ARMS, figure, qat_args, quant_config, report

MODEL = "scratch:vit-fmnist-deep"  # --model scratch:vit-fmnist-wide is the width lever (d=256)
# What a resumed root must share with the run that started it (the rest, seeds and test images, may change).
BUSY = 3  # a --stage child's exit code when another process holds its stage
FIXED = ("model", "steps_per_epoch", "epochs", "lr", "ft_lr", "curve_points", "calib")


def pretrain(root: Path, name: str, model: str, steps: int, lr: float, points: int, extra: list[str]) -> list[str]:
    every = math.ceil(steps / points)
    return ["s2d", "finetune", model, "--task", "image", "--image-data", "fashion-mnist", "--steps", str(steps),
            "--batch-size", str(BATCH), "--lr", str(lr), "--weight-decay", "0", "--warmup", str(min(200, steps // 4)),
            "--seed", str(PRETRAIN_SEED), "--eval-every", "0", "--checkpoint-every", str(every),
            "--config", str(root / "pretrain.yaml"), *extra, "--resume", "--out", str(root / name)]


class Data:
    """The test images (first n_test) and the calibration images (first CALIB training images), loaded once."""

    def __init__(self, n_test: int):
        from s2d.assets import load_fashion_mnist

        self.test = load_fashion_mnist("test")
        self.test = (self.test[0][:n_test], self.test[1][:n_test])
        self.train_images = load_fashion_mnist("train")[0]

    def batches(self, model) -> tuple[dict, dict]:
        from s2d.assets import pixel_values

        cfg = model.config
        size, ch = int(cfg.image_size), int(cfg.num_channels)
        test = {"pixel_values": pixel_values(self.test[0].float() / 255, size, ch), "labels": self.test[1]}
        calib = {"pixel_values": pixel_values(self.train_images[:CALIB].float() / 255, size, ch)}
        return test, calib


@torch.no_grad()
def activation_maxima(model, pixels: torch.Tensor) -> dict:
    """max |x| over the blocks' outputs (residual stream) and over the quantized Linears' inputs, by role; and per
    block, the output's max |x| and median |x| (a per-tensor static scale's step against the typical value)."""
    from s2d.arch import describe

    desc = describe(model)
    residual, inputs, blocks = [0.0], {}, []

    def block_hook(module, args, output):
        out = (output[0] if isinstance(output, tuple) else output).abs()
        blocks.append({"max": float(out.max()), "median": float(out.median())})
        residual[0] = max(residual[0], blocks[-1]["max"])

    def linear_hook(role):
        def hook(module, args):
            inputs[role] = max(inputs.get(role, 0.0), float(args[0].abs().max()))
        return hook

    handles = [b.module.register_forward_hook(block_hook) for b in desc.blocks]
    handles += [lin.module.register_forward_pre_hook(linear_hook(lin.role)) for lin in desc.linears()]
    try:
        model(pixel_values=pixels)
    finally:
        for h in handles:
            h.remove()
    return {"residual": residual[0], "linear_input": max(inputs.values()), "by_role": inputs,
            "norm_cap": norm_caps(desc), "blocks": blocks}


def norm_caps(desc) -> dict[str, float]:
    """Per kind of pre-norm (attn_in, mlp_in), the largest output any input can give, over the blocks.

    A LayerNorm's output before its affine has mean 0 and sum of squares at most d, so no element exceeds sqrt(d-1)
    (one element a, the rest -a/(d-1) each, attains it): however large a residual outlier, the Linear after the norm
    sees at most sqrt(d-1) * max|gain| + max|bias|. Only torch's LayerNorm is read (the ViT's norm); others are left
    out rather than guessed.
    """
    caps: dict[str, float] = {}
    for block in desc.blocks:
        for name, kind in block.norms.items():
            norm = desc.module(name)
            if not isinstance(norm, torch.nn.LayerNorm) or norm.weight is None:
                continue
            d = norm.weight.numel()
            bias = 0.0 if norm.bias is None else float(norm.bias.abs().max())
            cap = math.sqrt(d - 1) * float(norm.weight.abs().max()) + bias
            caps[kind] = max(caps.get(kind, 0.0), cap)
    return caps


@torch.no_grad()
def measure(model, data: Data, cells: tuple[str, ...]) -> dict:
    """Test accuracy of the FP model and of each cell's PTQ copy, with max |x| on the calibration images."""
    from s2d.eval import classification_accuracy
    from s2d.quant import quantize

    model.eval()
    test, calib = data.batches(model)
    t0 = time.perf_counter()
    out = {"n_test": len(test["labels"]), "calib": CALIB, "max_abs": activation_maxima(model, calib["pixel_values"]),
           "FP": classification_accuracy(model, test), "configs": {}}
    for cell in cells:
        if cell == "FP":
            continue
        config = quant_config(cell)
        q = quantize(copy.deepcopy(model), config, calib=calib, progress=False)
        out[cell] = classification_accuracy(q, test)
        out["configs"][cell] = config.to_dict()
    out["seconds"] = time.perf_counter() - t0
    return out


def with_cells(done: dict, new: dict, missing: tuple[str, ...]) -> dict:
    """`done` (a ptq.json or curve point from before some cells existed) with the `missing` cells of `new` merged in;
    its own FP and max |x| are kept."""
    return {**done, **{c: new[c] for c in missing if c != "FP"},
            "configs": {**done.get("configs", {}), **new["configs"]}}


def measure_model(folder: Path, data: Data, cells: tuple[str, ...] = CELLS) -> None:
    """ptq.json: every one of `cells`; a ptq.json that lacks some (written before they existed, or for fewer cells)
    gets just those measured and merged in (the cells already there, and its FP and max |x|, are kept as they
    are)."""
    from s2d.assets import load_model
    from s2d.io import atomic_write_json

    path = folder / "ptq.json"
    done = json.loads(path.read_text()) if path.is_file() else None
    missing = cells if done is None else tuple(c for c in cells if c not in done)
    old_record = done is not None and "blocks" not in done["max_abs"]
    if not missing and not old_record:
        return
    model, _ = load_model(str(folder / "model"))
    if old_record:  # written before the per-block record: one forward adds it
        model.eval()
        done["max_abs"]["blocks"] = activation_maxima(model, data.batches(model)[1]["pixel_values"])["blocks"]
        atomic_write_json(path, done)
    if not missing:
        return
    new = measure(model, data, missing)
    if done is None:
        atomic_write_json(path, new)
        return
    atomic_write_json(path, {**with_cells(done, new, missing), "seconds": done.get("seconds", 0.0) + new["seconds"]})


@torch.no_grad()
def measure_qat(folder: Path, data: Data) -> None:
    """qat.json: the QAT run's integer model (its learned static scales), its float weights, and static W4A4 PTQ of
    those weights with scales calibrated afresh on the calibration images."""
    from s2d import load_model  # not s2d.assets': it restores the QuantLinears of model-quantized/
    from s2d.eval import classification_accuracy
    from s2d.io import atomic_write_json
    from s2d.quant import quantize, quantized_layers

    if (folder / "qat.json").is_file():
        return
    t0 = time.perf_counter()
    model, _ = load_model(str(folder / "model"))
    integer, _ = load_model(str(folder / "model-quantized"))
    model.eval(), integer.eval()
    test, calib = data.batches(model)
    ptq_config = quant_config("W4A4 static")
    ptq = quantize(copy.deepcopy(model), ptq_config, calib=calib, progress=False)
    out = {"n_test": len(test["labels"]), "calib": CALIB, "max_abs": activation_maxima(model, calib["pixel_values"]),
           "W4A4 qat-static": classification_accuracy(integer, test), "FP": classification_accuracy(model, test),
           "W4A4 static": classification_accuracy(ptq, test),
           "configs": {"W4A4 qat-static": integer.s2d_quant_config.to_dict(), "W4A4 static": ptq_config.to_dict()},
           "act_scales": {"W4A4 qat-static": {n: float(m.act_scale) for n, m in quantized_layers(integer).items()},
                          "W4A4 static": {n: float(m.act_scale) for n, m in quantized_layers(ptq).items()}}}
    out["seconds"] = time.perf_counter() - t0
    atomic_write_json(folder / "qat.json", out)


def measure_curve(folder: Path, data: Data) -> None:
    """curve.json: the CURVE_CELLS measurements of every kept checkpoint, each written as it is done."""
    from safetensors.torch import load_model as load_weights

    from s2d.assets import load_model
    from s2d.experiments.record import setting
    from s2d.io import atomic_write_json

    path = folder / "curve.json"
    done = json.loads(path.read_text()) if path.is_file() else {"points": {}}
    for ckpt in sorted((folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(ckpt.name.split("-")[1])
        point = done["points"].get(str(step))
        missing = CURVE_CELLS if point is None else tuple(c for c in CURVE_CELLS if c not in point)
        if not missing:
            continue
        model, _ = load_model(setting(folder, "model"))
        load_weights(model, str(ckpt / "model.safetensors"))
        new = measure(model, data, missing)
        done["points"][str(step)] = {"step": step, **new} if point is None else with_cells(point, new, missing)
        atomic_write_json(path, done)


def stage(root: Path, name: str, cmd: list[str], data: Data, curve: bool = False, qat: bool = False,
          cells: tuple[str, ...] = CELLS) -> bool:
    """Train (unless finished) and measure one stage; False, doing nothing, if another process holds it."""
    t0 = time.perf_counter()
    (root / ".locks").mkdir(exist_ok=True)
    # An advisory lock per stage, released by the OS when its holder dies: two invocations on one root (a --jobs
    # run beside a --stage one) never train or measure the same folder at once, and a killed run leaves no claim.
    with (root / ".locks" / name).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"  {name}: running in another process; skipped here (rerun to pick it up if that one stops)",
                  flush=True)
            return False
        if not (root / name / "metrics.json").is_file():
            run(cmd, root / "log.txt")
        if curve:
            measure_curve(root / name, data)
        if qat:
            measure_qat(root / name, data)
        else:
            measure_model(root / name, data, cells)
    print(f"  {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def write_plan(root: Path, args: argparse.Namespace) -> None:
    from s2d.assets import load_fashion_mnist
    from s2d.io import atomic_write_json, atomic_write_text

    plan = {"command": " ".join(["python", "bench/exp_vit_static.py", *sys.argv[1:]]), "smoke": args.smoke,
            "model": args.model, "steps_per_epoch": args.steps_per_epoch, "epochs": args.epochs, "lr": args.lr,
            "ft_lr": args.ft_lr, "curve_points": args.curve_points, "calib": CALIB, "seeds": args.seeds,
            "n_test": args.n_test, "train_images": len(load_fashion_mnist("train")[1])}
    path = root / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in FIXED if old.get(k) != plan[k]]
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)} → {plan[k]}" for k in changed)
            raise SystemExit(f"{root} was started with other settings ({diff}); rerun with those, or choose another "
                             "--root")
        plan["seeds"] = sorted({*old.get("seeds", []), *args.seeds})
        if args.levers_only:  # the arms' command stays the one their section quotes
            plan["command"] = old.get("command", plan["command"])
        if "lever_command" in old:  # and a later run without --levers keeps the levers' own
            plan["lever_command"] = old["lever_command"]
    if args.levers:
        plan["lever_command"] = " ".join(["python", "bench/exp_vit_static.py", *sys.argv[1:]])
    atomic_write_json(path, plan)
    keep = root / "pretrain.yaml"
    if not keep.is_file():  # written once: a --jobs child must not rewrite it under a running pre-training
        atomic_write_text(keep, "keep_checkpoints: 1000\n")  # every checkpoint is a point of the curve


def later_stages(root: Path, args: argparse.Namespace, spe: int, steps: int) -> list[tuple[str, list[str], dict]]:
    """The stages after `pretrain-long`, longest first: the S2D pre-training, the fine-tunes, then the QAT runs
    (last, so the folders of a run started before the QAT arms existed are reached after everything it planned),
    then the --levers fine-tunes. With --levers-only, just the two arms' fine-tunes and the levers, seed by seed,
    measured on LEVER_CELLS (a later full run adds the arms' other cells). Each needs only `pretrain-long` and
    selection.json, so they may run side by side (--jobs)."""
    option = select_tau(root)["reg_option"]
    s2d = [*S2D, "--reg-option", option]
    long = str(root / "pretrain-long" / "model")

    def tune(name: str, seed: int, extra: list[str], kind: dict) -> tuple[str, list[str], dict]:
        return name, finetune(long, spe, args.ft_lr, spe // 10, seed, root / name, extra), kind

    levers = [tune(f"lever-{lever}-s{seed}", seed, s2d_flags(s2d, LEVERS[lever]), {"cells": LEVER_CELLS})
              for seed in args.seeds for lever in args.levers]
    if args.levers_only:
        arms = [tune(f"{arm}-s{seed}", seed, extra, {"cells": LEVER_CELLS}) for seed in args.seeds
                for arm, extra in zip(ARMS, (["--reg", "none"], s2d), strict=True)]
        return sorted([*arms, *levers], key=lambda st: args.seeds.index(int(st[0].rsplit("-s", 1)[1])))
    out = [("pretrain-long-s2d", pretrain(root, "pretrain-long-s2d", args.model, steps, args.lr, args.curve_points,
                                          s2d), {"curve": True})]
    for arms, qat in ((ARMS, []), (QAT_ARMS, qat_args())):
        for seed in args.seeds:  # the pre-training is shared; the seed draws the fine-tune's batches
            for arm, extra in zip(arms, (["--reg", "none"], s2d), strict=True):
                out.append(tune(f"{arm}-s{seed}", seed, [*extra, *qat], {"qat": bool(qat)}))
    return [*out, *levers]


def run_parallel(root: Path, plan: list[tuple[str, list[str], dict]], jobs: int) -> None:
    """Each stage in its own `--stage NAME` process of this script, `jobs` at a time, in plan order; every child
    trains (one thread each, as OMP_NUM_THREADS says) and measures its own folder, so no two write the same file.
    A failed stage stops no other; the first failure is raised once all have ended."""
    import os
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    base = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def child(name: str) -> int:
        with (root / "log.txt").open("a") as log:
            print(f"  {name}: started", flush=True)
            return subprocess.run([*base, "--stage", name], stdout=log, stderr=subprocess.STDOUT, env=env).returncode

    names = [name for name, _, _ in plan]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = dict(zip(names, pool.map(child, names), strict=True))
    busy = [n for n, c in codes.items() if c == BUSY]
    if busy:
        print(f"  left to the process running them: {', '.join(busy)}", flush=True)
    failed = [n for n, c in codes.items() if c not in (0, BUSY)]
    if failed:
        raise SystemExit(f"stages failed: {', '.join(failed)} (see {root / 'log.txt'}); rerun to resume them")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="runs/exp-vit-static (runs/exp-vit-static-smoke with "
                    "--smoke)")
    ap.add_argument("--epochs", type=int, default=30, help="pre-training epochs")
    ap.add_argument("--steps-per-epoch", type=int, default=469)  # 60,000 images / batch 128
    ap.add_argument("--lr", type=float, default=2e-3, help="pre-training peak learning rate")
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tune learning rate (one epoch)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds (batches)")
    ap.add_argument("--curve-points", type=int, default=8, help="checkpoints measured along each pre-training")
    ap.add_argument("--n-test", type=int, default=10000, help="test images for accuracy (all 10,000 by default)")
    ap.add_argument("--table", action="store_true", help="only read the run folders and print the table")
    ap.add_argument("--smoke", action="store_true", help="every stage at a tiny size, to check the pipeline")
    ap.add_argument("--jobs", type=int, default=1, help="stages after pretrain-long run this many at a time, each in "
                    "its own process (give each a core: OMP_NUM_THREADS=1)")
    ap.add_argument("--model", default=MODEL, choices=[f"scratch:{m}" for m in SCRATCH_MODELS if m != "vit-fmnist"],
                    help="the scratch ViT pre-trained (vit-fmnist-wide: d=256, the width lever)")
    ap.add_argument("--pretrain-only", action="store_true", help="stop after pretrain-long and its measurements "
                    "(a probe of whether a pre-training's outliers cost static PTQ, before the arms are run on it)")
    ap.add_argument("--levers", nargs="+", default=[], choices=list(LEVERS), help="also fine-tune these S2D "
                    "levers (s2d.experiments.vit_levers.LEVERS) at every seed, measured on its LEVER_CELLS")
    ap.add_argument("--levers-only", action="store_true", help="after pretrain-long, run only the two arms' "
                    "fine-tunes and the --levers, seed by seed, all measured on LEVER_CELLS")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # one stage, for --jobs' child processes
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.steps_per_epoch, args.curve_points, args.n_test = 4, 6, 4, 200
    root = args.root or Path("runs/exp-vit-static-smoke" if args.smoke else "runs/exp-vit-static")
    root.mkdir(parents=True, exist_ok=True)
    if not args.table:
        if args.stage is None:  # a --jobs child's command line is its parent's plus --stage: not the run's
            write_plan(root, args)
        spe, steps = args.steps_per_epoch, args.steps_per_epoch * args.epochs
        data = Data(args.n_test)
        if args.stage is None:
            stage(root, "pretrain-long", pretrain(root, "pretrain-long", args.model, steps, args.lr,
                                                  args.curve_points, ["--reg", "none"]), data, curve=True)
        if args.pretrain_only and args.stage is None:
            print(report(root))
            return
        plan = later_stages(root, args, spe, steps)
        if args.stage is not None:
            name, cmd, kind = next(s for s in plan if s[0] == args.stage)
            if not stage(root, name, cmd, data, **kind):
                raise SystemExit(BUSY)
            return
        if args.jobs == 1:
            for name, cmd, kind in plan:
                stage(root, name, cmd, data, **kind)
        else:
            run_parallel(root, plan, args.jobs)
    print(report(root))
    if vit_levers.arm_names(root):
        print("\nLevers of the S2D fine-tune:\n\n" + vit_levers.table(root) + "\n"
              + "\n".join(f"- {line}" for line in vit_levers.reading(root)))
    path = figure(root, root / "figures" / "vit-static-curve.png")
    if path is not None:
        print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()
