"""SmolLM2 with per-tensor activations (issue 21, items 5, 6): does S2D's smaller max pay where the max sets the scale?

Stages, each skipped once its result exists, so the script resumes where it stopped:
1. fine-tunes: AdamW and the headline S2D arm at 100 and 300 steps, seed 0, by exp_smollm2_s2d.py's own finetune
   command (its ARMS and stages, imported), each into <root>/<arm>-steps<N>-s<seed>/finetune;
2. cells: per model, one process that loads it once and, for every cell of s2d.experiments.smollm2_per_tensor
   (W8A8 O1–O3 and without smoothing, W6A6 per-tensor static/dynamic with their per-token controls, W4A4 `best`),
   quantizes a copy with s2d.quant.quantize and scores wiki-test ppl@128 on the first --ppl-tokens tokens, writing
   <model>/cells/<cell>.json atomically (a cell that overflows records why); plus <model>/residual.json, the
   residual stream's max |x| per position on the FP cell's perplexity windows.
The starting model is measured as the model `start`. --table prints the table and the reading from the folders.

Usage: python bench/smollm2_per_tensor.py [--root runs/smollm2-per-tensor] [--models NAME ...] [--cells CELL ...]
       [--smoke] [--table]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import subprocess
import sys
import time
from pathlib import Path

from exp_smollm2_s2d import run, stages  # the arms' finetune commands, never retyped here

from s2d.experiments.smollm2 import HEADLINE
from s2d.experiments.smollm2_per_tensor import ADAMW, CELLS, cell_file, model_name, reading, table

START = "smollm2-135m"
STEPS, SEED = (100, 300), 0  # the second run's 100 steps and the third run's 300 (docs/results.md)
LR = 5e-5  # exp_smollm2_s2d.py's --lr default, which both runs used (their finetune/config.yaml records it)
PPL_TOKENS, CALIB = 8192, (32, 512)  # the experiment's --ppl-tokens; `s2d quantize`'s calibration (n × seq_len)
# A smoke run: a seeded tiny Llama, a few steps, short text; it checks the pipeline, not the question.
SMOKE = {"model": "tiny:llama", "steps": (2, 4), "ppl_tokens": 512, "calib": (4, 128)}


def plan(args) -> dict[str, tuple[str, int] | None]:
    """Model name -> (arm, steps), or None for the starting model."""
    out: dict[str, tuple[str, int] | None] = {"start": None}
    for steps in args.steps:
        for arm in (ADAMW, HEADLINE):
            out[model_name(arm, steps, SEED)] = (arm, steps)
    return out


def finetune(name: str, arm: str, steps: int, args) -> None:
    """exp_smollm2_s2d.py's finetune stage, its arguments unchanged but steps and the folder."""
    folder = args.root / name
    if (folder / "finetune" / "metrics.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(model=args.model, steps=steps, lr=LR, seed=SEED, ppl_tokens=args.ppl_tokens, gptq=False)
    run(stages(arm, ns, folder)["finetune"], folder / "log.txt")


def spec(name: str, args) -> str:
    return args.model if name == "start" else str(args.root / name / "finetune" / "model")


@contextlib.contextmanager
def residual_max(model):
    """Max |x| of the residual stream (every block's output) per token position, over the forwards inside."""
    import torch

    from s2d.arch import describe

    per_pos: dict[str, torch.Tensor] = {}

    def hook(module, args, out):
        h = (out[0] if isinstance(out, tuple) else out).detach().abs().float().amax(dim=(0, 2))
        old = per_pos.get("max", torch.zeros(0))
        longer, shorter = (old.clone(), h) if old.numel() >= h.numel() else (h.clone(), old)
        longer[: shorter.numel()] = torch.maximum(longer[: shorter.numel()], shorter)
        per_pos["max"] = longer

    handles = [b.module.register_forward_hook(hook) for b in describe(model).blocks]
    try:
        yield per_pos
    finally:
        for h in handles:
            h.remove()


def residual_record(per_pos) -> dict:
    # The three loudest positions: the issue places SmolLM2's massive activations on three tokens (0, 1, 4).
    loud = per_pos.topk(min(3, per_pos.numel())).indices.sort().values
    rest = per_pos.clone()
    rest[loud] = 0
    return {"max_abs": float(per_pos.max()), "loudest_positions": loud.tolist(), "max_abs_elsewhere": float(rest.max()),
            "per_position_max": [round(float(v), 4) for v in per_pos], "on": "the FP perplexity windows"}


def measure(name: str, args) -> None:
    """Every missing cell of one model, in this process: load once, quantize a copy per cell, score, write.

    The SmoothQuant cells share one smoothed copy: smoothing depends on the model, the calibration batch and α only
    (not on bits or granularity), so `prepare` runs once and `convert` once per cell, as `quantize` would do them.
    """
    from s2d.assets import calibration_batch, wiki_text
    from s2d.commands.load import load_model
    from s2d.errors import S2DError
    from s2d.eval.suite import EvalConfig, evaluate
    from s2d.io import atomic_write_json
    from s2d.quant import convert, prepare
    from s2d.quant.api import check_quantizable

    folder = args.root / name
    todo = [c for c in ("FP", *args.cells) if not (folder / "cells" / cell_file(c)).is_file()]
    if not (folder / "residual.json").is_file() and "FP" not in todo:
        todo.insert(0, "FP")  # the residual max is measured on the FP cell's forwards
    if not todo:
        return
    model, tokenizer = load_model(spec(name, args))
    n, seq_len = args.calib
    calib = calibration_batch(tokenizer, wiki_text("train"), n, seq_len, SEED)
    eval_config = EvalConfig(tasks=("ppl:wiki",), seq_lens=(128,), ppl_tokens=args.ppl_tokens, seed=SEED)
    configs = {c: CELLS[c].config(seed=SEED) for c in todo if c != "FP"}
    for q in configs.values():  # before any work: a cell the model cannot take fails now, not hours in
        check_quantizable(model, q)
    prepared: dict[tuple, object] = {}  # the smoothing each group of cells shares -> its smoothed FP copy
    for cell in todo:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {cell}", flush=True)
        qconfig, t0 = configs.get(cell), time.perf_counter()
        if qconfig is None:
            m = model
        elif qconfig.smooth_alpha is not None and not qconfig.rotate and not qconfig.ln_reparam:
            key = ("smooth", qconfig.smooth_alpha)
            if key not in prepared:
                prepared[key] = prepare(copy.deepcopy(model), qconfig, calib=calib, progress=False)
            m = convert(copy.deepcopy(prepared[key]), qconfig, calib=calib, progress=False)
        else:
            m = convert(prepare(copy.deepcopy(model), qconfig, calib=calib, progress=False), qconfig, calib=calib,
                        progress=False)
        seconds, entry = time.perf_counter() - t0, {"ppl": None}
        try:
            with residual_max(m) if cell == "FP" else contextlib.nullcontext({}) as peak:
                ev = evaluate(m, tokenizer, eval_config, progress=False)
            entry = {"ppl": ev["ppl:wiki@128"]["ppl"], "eval": ev}
            if cell == "FP":
                atomic_write_json(folder / "residual.json", residual_record(peak["max"]))
        except S2DError as err:  # an overflowed cell is a result too: it says so instead of being retried forever
            entry["error"] = str(err)
        atomic_write_json(folder / "cells" / cell_file(cell), {
            "model": name, "start_model": args.model, "model_path": spec(name, args), "cell": cell,
            "config": None if qconfig is None else qconfig.to_dict(), "eval_config": eval_config.to_dict(),
            "calibration": {"n_samples": n, "seq_len": seq_len, "seed": SEED, "split": "wiki train"},
            "quantize_seconds": round(seconds, 2), "eval_seconds": round(time.perf_counter() - t0 - seconds, 2),
            **entry})
        del m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="default runs/smollm2-per-tensor (runs/smollm2-per-tensor-smoke)")
    ap.add_argument("--models", nargs="+", help="model names (start, adamw-steps100-s0, ...; default all)")
    ap.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    ap.add_argument("--smoke", action="store_true", help=f"{SMOKE['model']}, steps {SMOKE['steps']}, "
                    f"{SMOKE['ppl_tokens']} ppl tokens: the pipeline in a couple of minutes")
    ap.add_argument("--table", action="store_true", help="only print the table and the reading")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one model's cells, in its own process
    args = ap.parse_args()
    smoke = SMOKE if args.smoke else {"model": START, "steps": STEPS, "ppl_tokens": PPL_TOKENS, "calib": CALIB}
    vars(args).update(smoke)
    args.root = args.root or Path("runs/smollm2-per-tensor" + ("-smoke" if args.smoke else ""))
    if args.worker:
        return measure(args.worker, args)
    models = plan(args)
    unknown = [m for m in args.models or [] if m not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(models)}")
    if not args.table:
        for name in args.models or models:
            if models[name] is not None:
                finetune(name, *models[name], args)
            extra = ["--smoke"] if args.smoke else []
            subprocess.run([sys.executable, __file__, "--worker", name, "--root", str(args.root), "--cells",
                            *args.cells, *extra], check=True)
    print(table(args.root))
    print("\n".join(f"- {line}" for line in reading(args.root)))


if __name__ == "__main__":
    main()
