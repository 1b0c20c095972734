"""Reading the W4A4 ladder (bench/w4a4_ladder.py runs it): one finished `s2d quantize` run folder per rung."""

from __future__ import annotations

from pathlib import Path

from s2d.experiments.record import metrics, run_config, shared

# The field's rungs (Llama-3.2-1B, WikiText-2, KV16; SPEC §3) beside ours where one corresponds: theirs.
THEIRS = {"rtn": "RTN, clip, asymmetric, no rotation: 26×",
          "rotate": "random Hadamard R1, no online Hadamard: 11× (ours has the online R4 too)",
          "best-learned": "learned R1/R2 + online R4 (SpinQuant): 1.9×",
          "recipe-spinquant": "learned R1/R2 + online R4 (SpinQuant): 1.9×",
          "recipe-quarot": "QuaRot GPTQ: 1.24× (Phi-3-mini)",
          "rotate-r2-clip-gptq-full-asym-wmse-ag32": "QuaRot-style GPTQ act-order, A4 asymmetric dynamic g32: 1.45×",
          "recipe-best-kv4": "FlatQuant W4A4KV4: 1.23×; QuaRot W4A4KV4 GPTQ on LLaMA-2-7B: 1.12×",
          "recipe-quarot-kv4": "QuaRot W4A4KV4 GPTQ on LLaMA-2-7B: 1.12×"}


def cell(folder: Path) -> dict | None:
    """The rung's FP and quantized perplexity and quantize seconds, or None until its run has finished."""
    m = metrics(folder)
    if not m or not m.get("complete"):
        return None
    (key, entry), = [(k, v) for k, v in m["results"].items() if k != "FP"]
    (task, fp), = m["results"]["FP"]["eval"].items()
    q = entry["eval"][task]
    return {"cell": key, "task": task, "config": entry["config"], "fp_ppl": fp["ppl"], "ppl": q["ppl"],
            "n_tokens": q["n_tokens"], "ratio": q["ppl"] / fp["ppl"], "quantize_seconds": entry["seconds"]}


def finished(root: Path, names) -> dict[str, dict]:
    return {n: c for n in names if (c := cell(root / n)) is not None}


def table(root: Path, names) -> str:
    """The ladder as Markdown: each rung's cell, perplexity, ratio to FP and the field's rung beside it."""
    cells = finished(root, names)
    if not cells:
        return "(no rung has finished)"
    first = next(iter(cells.values()))
    threads = sorted({run_config(root / n)["threads"] for n in cells})
    head = [f"SmolLM2 wiki-test perplexity ({first['task']}), FP {first['fp_ppl']:.2f}, {first['n_tokens']:,} tokens "
            "scored; "
            f"calibration {shared([root / n for n in cells], 'n_samples')}×"
            f"{shared([root / n for n in cells], 'seq_len')} wiki-train tokens; quantize seconds on "
            f"{' / '.join(map(str, threads))} torch thread(s).", "",
            "| rung | scheme and options (the run's command) | ppl | × FP | quantize s | the field's rung (theirs) |",
            "|---|---|---|---|---|---|"]
    rows = [f"| {n} | {options(root / n)} | {c['ppl']:.2f} | {c['ratio']:.2f}× | {c['quantize_seconds']:.0f} | "
            f"{THEIRS.get(n, '')} |" for n, c in cells.items()]
    missing = [n for n in names if n not in cells]
    tail = ["", f"Not finished when this was generated: {', '.join(missing)}."] if missing else []
    return "\n".join(head + rows + tail)


def options(folder: Path) -> str:
    """What distinguishes a rung, read from its recorded argv: scheme, method, rotation and every --option."""
    argv = run_config(folder)["argv"]
    out = []
    for flag, value in zip(argv, [*argv[1:], None], strict=True):
        if flag in ("--scheme", "--method"):
            out.append(value)
        elif flag == "--option":
            out.append(f"`{value}`")
        elif flag == "--rotate":
            out.append("rotate")
        elif flag == "--recipe":
            out.append(f"recipe {value}")
        elif flag in ("--avg-bits", "--high-scheme"):
            out.append(f"{flag[2:]} {value}")
    return " ".join(out)
