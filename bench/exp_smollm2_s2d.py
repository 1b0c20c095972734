"""Experiment 1 in miniature: does S2D on SmolLM2 reduce outliers and help W4A4, against AdamW and baselines?

Every arm fine-tunes SmolLM2 on wiki *train* text with the same data order, steps, batch and learning rate
(`s2d finetune`, resumable from its checkpoints), then is measured the same way on wiki *test*:
- `quant`:   `s2d quantize --sweep`, W8A8 / W6A6 / W4A4 × RTN, rotation+RTN, SmoothQuant+RTN, per-token
             activations, perplexity on the first --ppl-tokens test tokens;
- `quant-pt`: W4A4 RTN with per-tensor activations, same tokens;
- `eval`:    polarity and analogy accuracy of the full-precision model;
- `diagnose`: max|x|, σ₁ and PCDR of every Linear.
The starting model is measured as the arm "start". A stage whose metrics.json exists is skipped, so the
script resumes where it stopped. --table prints the Markdown tables from the finished run folders, and
--figures writes the experiment's figures (both read by s2d.experiments.smollm2).

Usage: python bench/exp_smollm2_s2d.py [--arms start adamw s2d-decoupled ...] [--steps 100] [--seed 0]
       [--root runs/exp-smollm2] [--table] [--figures DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from s2d.experiments.smollm2 import METHODS, SCHEMES, answers, figures, levers, reading, table

# The decoupled form shrinks σ_k by η·λ·σ_kⁿ per step: at η = 5e-5 and σ₁ ≈ 28 (block 11's down_proj),
# λ = 2 removes about 25% of σ₁ in 100 steps, the probe's effective regime (SPEC §2). The coupled form keeps
# the paper's λ = 5e-4: under Adam its strength barely depends on λ. Refreshing every 25 steps (the default
# m is 100) gives four readings of the selected σ over a 100-step run and lets the selection follow the decay.
S2D = ["--reg", "s2d", "--reg-option", "refresh_every=25"]
DECOUPLED = [*S2D, "--reg-option", "form=decoupled", "--reg-option", "lam=2.0"]
ARMS = {
    "adamw": ["--reg", "none"],
    "s2d-decoupled": DECOUPLED,
    "s2d-decoupled-fold": [*DECOUPLED, "--reg-option", "fold_norms=true"],
    "s2d-decoupled-outliers": [*DECOUPLED, "--reg-option", "pcdr_rows=outliers", "--reg-option", "tau=0.8"],
    # The λ sweep, on the selection that reaches the massive-activation writer (λ = 2 is the arm above).
    **{f"s2d-decoupled-outliers-lam{lam}": [*S2D, "--reg-option", "form=decoupled", "--reg-option", f"lam={lam}",
                                            "--reg-option", "pcdr_rows=outliers", "--reg-option", "tau=0.8"]
       for lam in ("0.5", "8")},
    "s2d-coupled": [*S2D, "--reg-option", "form=coupled", "--reg-option", "lam=5e-4"],
    "specnorm": ["--reg", "specnorm"],
    "kure": ["--reg", "kure"],
    # The control for the fold arm: the same folded model and selection, no decay (is it the folding or S2D?).
    "adamw-fold": [*S2D, "--reg-option", "form=decoupled", "--reg-option", "lam=0", "--reg-option", "fold_norms=true"],
    "kure-lam1": ["--reg", "kure", "--reg-option", "lam=1.0"],  # the default 1e-2 barely moved its penalty here
    # Two more selection rules (experiment 4): a low τ over all rows reaches block 11's down_proj too, and a high
    # τ over the outlier rows leaves it out (bench/s2d_selection.py tabulates which Linears each rule picks).
    "s2d-decoupled-tau0.5": [*DECOUPLED, "--reg-option", "tau=0.5"],
    "s2d-decoupled-outliers-tau0.95": [*DECOUPLED, "--reg-option", "pcdr_rows=outliers", "--reg-option", "tau=0.95"],
}
DEFAULT_ARMS = ["start", "adamw", "s2d-decoupled", "s2d-decoupled-fold", "s2d-coupled", "specnorm", "kure",
                "s2d-decoupled-outliers"]


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    exe = str(Path(sys.executable).with_name("s2d"))
    with log.open("a") as f:
        subprocess.run([exe, *cmd[1:]], check=True, stdout=f, stderr=subprocess.STDOUT)


def stages(name: str, args, folder: Path) -> dict[str, list[str]]:
    """Stage name -> command, in order; each writes folder/<stage>/metrics.json."""
    model = args.model if name == "start" else str(folder / "finetune" / "model")
    ppl = ["--ppl-tokens", str(args.ppl_tokens)]
    out = {}
    if name != "start":
        out["finetune"] = ["s2d", "finetune", args.model, "--task", "lm", *ARMS[name], "--steps",
                           str(args.steps), "--lr", str(args.lr), "--batch-size", "2", "--seq-len", "256",
                           "--warmup", "10", "--seed", str(args.seed), "--eval-every", "0",
                           "--checkpoint-every", "25"]
    out["quant"] = ["s2d", "quantize", model, "--sweep", "--schemes", SCHEMES, "--methods", METHODS,
                    "--eval", "ppl:wiki", *ppl]
    out["quant-pt"] = ["s2d", "quantize", model, "--scheme", "W4A4", "--option", "a_granularity=per_tensor",
                       "--eval", "ppl:wiki", *ppl, "--no-model"]
    out["eval"] = ["s2d", "eval", model, "--tasks", "polarity,analogy-mc"]
    out["diagnose"] = ["s2d", "diagnose", model]
    if args.gptq:  # optional: ~2 min per cell here, so the GPTQ columns come after the rest
        out["quant-gptq"] = ["s2d", "quantize", model, "--sweep", "--schemes", SCHEMES, "--methods", "gptq",
                             "--eval", "ppl:wiki", *ppl, "--no-model"]
    # A stage reruns until its metrics.json exists: the resumable ones continue, the others start over.
    again = {k: "--resume" if v[1] in ("finetune", "quantize") else "--overwrite" for k, v in out.items()}
    return {k: [*v, again[k], "--out", str(folder / k)] for k, v in out.items()}


def arm(name: str, args, root: Path) -> None:
    folder = root / f"{name}-s{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for stage, cmd in stages(name, args, folder).items():
        if not (folder / stage / "metrics.json").is_file():
            run(cmd, folder / "log.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS)
    ap.add_argument("--model", default="smollm2-135m", help="the starting model (tiny:llama for a smoke run)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--root", type=Path, default=Path("runs/exp-smollm2"))
    ap.add_argument("--gptq", action="store_true", help="also measure W8A8/W6A6/W4A4 with GPTQ (a later stage)")
    ap.add_argument("--table", action="store_true", help="only print the tables of finished arms")
    ap.add_argument("--figures", type=Path, help="write the figures into this folder")
    args = ap.parse_args()
    if not args.table:
        for name in args.arms:
            if name != "start" and name not in ARMS:
                raise SystemExit(f"unknown arm {name!r}; known: start, {', '.join(ARMS)}")
            arm(name, args, args.root)
    print(table(args.root))
    print("\n".join(reading(args.root)))
    print("\n".join(levers(args.root)))
    print("\n".join(answers(args.root)))
    if args.figures:
        for file, caption in figures(args.root, args.figures):
            print(f"wrote {args.figures / file}: {caption}")


if __name__ == "__main__":
    main()
