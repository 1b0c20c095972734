"""Experiment 3, smoke level: MiniLM on polarity sentences, AdamW against AdamW + S2D, over several seeds.

Each (arm, seed) is one `s2d finetune minilm-l6 --task cls` run (160 train / 40 held-out sentences; the seed
picks the split, the head's initialization and the batch order), then the held-out accuracy of the FP model
and of RTN PTQ at W8A8 and W4A4 (per-channel weights, per-token activations). The data is tiny: 40 sentences
per seed, so one sentence is 2.5 points. The table gives, per arm and cell, the mean over seeds with a 95%
t-interval, and the pooled accuracy over every seed's held-out predictions with a 95% Wilson interval; then
each S2D arm's paired difference from AdamW per seed (same split, same initialization) with its t-interval.

A run folder with ptq.json is skipped, so the script resumes. The summary, table and readings are
s2d.experiments.minilm's, read from the run folders.

Usage: python bench/exp_minilm_polarity.py [--seeds 0 1 2 3 4] [--steps 80] [--root runs/exp-minilm] [--table]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from s2d.experiments.minilm import ARMS, LR, SEEDS, STEPS, command, settings, summary, table

OUT = Path(__file__).resolve().parent / "out" / "exp_minilm_polarity.json"


def finetune(arm: str, seed: int, args, out: Path) -> list[str]:
    return ["s2d", "finetune", "minilm-l6", "--task", "cls", *ARMS[arm], "--steps", str(args.steps), "--lr",
            str(args.lr), "--batch-size", "16", "--seq-len", "64", "--warmup", "8", "--seed", str(seed),
            "--eval-every", "0", "--checkpoint-every", str(args.steps), "--resume", "--out", str(out)]


@torch.no_grad()
def ptq(folder: Path, seed: int) -> dict:
    """Held-out predictions (right/wrong per sentence) of the FP model and of its RTN-quantized copies."""
    from s2d.assets import load_model
    from s2d.commands.tasks import ClassificationTask
    from s2d.eval.classify import predict
    from s2d.quant import QuantConfig, quantize

    model, tok = load_model(str(folder / "model"))
    model.eval()
    batch = ClassificationTask(tok, 64, seed).eval_batch()
    labels = batch.pop("labels")
    out = {"n": len(labels), "FP": (predict(model, batch) == labels).tolist()}
    for scheme in ("W8A8", "W4A4"):
        q = quantize(copy.deepcopy(model), QuantConfig.from_scheme(scheme), progress=False)
        out[f"{scheme} rtn"] = (predict(q, batch) == labels).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--lr", type=float, default=LR)
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
    if s["arms"]:  # the settings the run folders hold, whatever this command's flags
        ran = settings(args.root)
        s["command"], s["steps"], s["lr"] = command(ran), ran["steps"][0], ran["lr"][0]  # one each, or command() says
    OUT.parent.mkdir(parents=True, exist_ok=True)  # --table re-summarizes what finished
    OUT.write_text(json.dumps(s, indent=1))
    print(table(s))


if __name__ == "__main__":
    main()
