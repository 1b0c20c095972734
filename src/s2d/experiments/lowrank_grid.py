"""The SmolLM2 low-rank grid, read back: dense, svd, asvd, rom and rom + surgical search at 90/80/70% of the
parameters, and the kept 80% models quantized (bench/lowrank_grid.py runs the cells).

Each cell is one `s2d compress` run folder under the root, named after the cell; `<cell>-quant` is the
`s2d quantize --sweep` of a kept model. Everything here reads those folders; the settings the text states come
from their config.yaml and metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from s2d.experiments.record import MissingSetting, activations, hyper, shared

KEEPS = ("0.8", "0.9", "0.7")
ZERO_SHOT = ("analogy-mc", "polarity", "wiki-cloze")
# Cells whose model is kept and then quantized; plain svd at 80% has already collapsed in full precision
# (wiki ppl ~5e5), so its quantized figures would say nothing.
QUANTIZED = ("dense", "asvd-0.8", "rom-0.8")
QUANT_METHODS = ("rtn", "gptq", "rotate+gptq")  # rotation: the one baseline that keeps A4 usable on SmolLM2
QUANT_CELLS = ("FP", *(f"{s} {m}" for s in ("W6A6", "W4A4") for m in QUANT_METHODS))  # the sweep's result keys


def mean_acc(ev: dict) -> float:
    """Mean accuracy over the three zero-shot tasks of a cell's eval block."""
    return sum(ev[t]["acc"] for t in ZERO_SHOT) / len(ZERO_SHOT)


def cells() -> dict[str, list[str]]:
    """Cell name -> the `s2d compress` arguments that produce it."""
    out = {"dense": ["--method", "svd", "--keep", "1"]}
    for keep in KEEPS:
        for method in ("svd", "asvd", "rom"):
            out[f"{method}-{keep}"] = ["--method", method, "--keep", keep]
    for keep in KEEPS:
        out[f"rom+search-{keep}"] = ["--method", "rom", "--keep", keep, "--search", "ppl"]
    return out


def done(root: Path, search: bool | None = None) -> dict[str, Path]:
    """The cells that finished (metrics.json), in grid order; search: only the rom+search cells, or only the
    others."""
    return {name: root / name for name in cells() if (root / name / "metrics.json").is_file()
            and (search is None or name.startswith("rom+search") == search)}


def settings(root: Path) -> dict[str, str]:
    """What the grid's cells ran with, as the text states it: calibration, the evaluation (its perplexity window
    from the eval's name, tokens from config.yaml, the zero-shot examples each task was scored on) and the search's
    split and tolerance (from the search cells, "" while none finished)."""
    finished = list(done(root).values())
    if not finished:
        raise MissingSetting(f"{root} holds no finished cell")
    evals = [json.loads((f / "metrics.json").read_text())["eval"] for f in finished]
    windows = sorted({k.split("@", 1)[1] for ev in evals for k in ev if k.startswith("ppl:")})
    scored = {t: max(ev[t]["n"] for ev in evals) for t in ZERO_SHOT}
    most = max(scored.values())
    search = list(done(root, search=True).values())
    return {"calibration": f"{shared(finished, 'lowrank.n_samples')}×{shared(finished, 'lowrank.seq_len')}",
            "window": " / ".join(windows), "ppl_tokens": shared(finished, "ppl_tokens", "{:,}".format),
            "examples": str(most), "fewer": ", ".join(f"{t} has {n}" for t, n in scored.items() if n < most),
            "search_split": f"{shared(search, 'lowrank.search_samples')}×{shared(search, 'lowrank.seq_len')}"
            if search else "", "tolerance": shared(search, "lowrank.tolerance", hyper) if search else ""}


def quant_settings(root: Path) -> dict[str, str]:
    """The quantized models' evaluation: perplexity window and tokens (config.yaml), activation granularity (the
    cells' own configs)."""
    sweeps = [root / f"{name}-quant" for name in QUANTIZED if (root / f"{name}-quant" / "metrics.json").is_file()]
    return {"window": shared(sweeps, "eval_seq_len"), "ppl_tokens": shared(sweeps, "ppl_tokens", "{:,}".format),
            "activations": activations(sweeps)}


def quant_table(root: Path) -> str:
    from s2d.report import md_table

    rows = [[name, *[ppl.get(k) for k in QUANT_CELLS]] for name, ppl in quant_ppl(root).items()]
    return md_table(["model", *QUANT_CELLS], rows)


def quant_ppl(root: Path) -> dict[str, dict[str, float]]:
    """Per quantized model whose sweep has started: wiki-test perplexity by cell ("FP", "W4A4 gptq", ...)."""
    out = {}
    for name in QUANTIZED:
        path = root / f"{name}-quant" / "metrics.json"
        if path.is_file():
            res = json.loads(path.read_text())["results"]
            out[name] = {k: v["eval"]["ppl:wiki@128"]["ppl"] for k, v in res.items()}
    return out


def table(root: Path) -> str:
    from s2d.report import md_table
    from s2d.runs import recorded_threads

    rows = []
    for name in cells():
        path = root / name / "metrics.json"
        if not path.is_file():
            rows.append((name, "pending", *[""] * 9))
            continue
        m = json.loads(path.read_text())
        s, ev = m["compression"]["summary"], m["eval"]
        rows.append((name, round(s["fraction_kept"], 4), round(s["block_linear_fraction_kept"], 4),
                     round(ev["ppl:wiki@128"]["ppl"], 2), *[round(ev[t]["acc"], 3) for t in ZERO_SHOT],
                     round(mean_acc(ev), 3),
                     round(m["compression"]["seconds"]), recorded_threads(root / name) or ""))
    return md_table(["cell", "params kept", "block-Linear params kept", "wiki test ppl@128", "analogy-mc acc",
                     "polarity acc", "wiki-cloze acc", "mean acc", "compress wall s", "threads"], rows)


def search_rows(root: Path) -> list[list]:
    """One row per finished surgical-search cell: whether it met its target, how far it walked, and what it cost."""
    from s2d.runs import recorded_threads

    rows = []
    for name in cells():
        path = root / name / "metrics.json"
        if not name.startswith("rom+search") or not path.is_file():
            continue
        m = json.loads(path.read_text())
        c, ev = m["compression"], m["eval"]
        info = c["search"]
        limit = info["ppl_ref"] * info["tolerance"] ** info["layers_processed"]
        rows.append([name, "yes" if info["target_reached"] else "no", round(c["summary"]["fraction_kept"], 4),
                     info["layers_processed"], len(c["ranks"]),
                     f"{info['ppl_ref']:.2f} → {info['ppl_final']:.2f}", round(limit, 2),
                     round(ev["ppl:wiki@128"]["ppl"], 2), round(mean_acc(ev), 3), round(c["seconds"]),
                     recorded_threads(root / name) or ""])
    return rows


def search_stops(root: Path) -> list[str]:
    """For each search cell that stopped above its target: which Linears the tolerance kept dense, by role."""
    from collections import Counter

    lines = []
    for name in cells():
        folder = root / name
        if not name.startswith("rom+search") or not (folder / "search_trials.json").is_file():
            continue
        m = json.loads((folder / "metrics.json").read_text())
        if m["compression"]["search"]["target_reached"]:
            continue
        walked = list(dict.fromkeys(t["layer"] for t in json.loads((folder / "search_trials.json").read_text())))
        dense = [layer for layer in walked if layer not in m["compression"]["ranks"]]
        roles = ", ".join(f"{role} {n}" for role, n in Counter(x.rsplit(".", 1)[1] for x in dense).most_common())
        ev = m["eval"]
        lines.append(f"{name} stopped at {m['compression']['summary']['fraction_kept']:.2%} of the parameters "
                     f"(wiki test ppl {ev['ppl:wiki@128']['ppl']:.2f}, mean zero-shot accuracy {mean_acc(ev):.3f}), "
                     f"above its target: it walked {len(walked)} Linears and kept {len(dense)} dense because no "
                     f"candidate rank that saves parameters kept the search perplexity within its limit ({roles}); "
                     "going lower needs a looser `--tolerance`.")
    return lines


def reading(root: Path) -> list[str]:
    """Per keep fraction: the methods ordered by mean zero-shot accuracy and by perplexity, from the cells."""
    from s2d.report.markdown import fmt

    def cell(name):
        path = root / name / "metrics.json"
        if not path.is_file():
            return None
        ev = json.loads(path.read_text())["eval"]
        return ev["ppl:wiki@128"]["ppl"], mean_acc(ev)

    read = {name: cell(name) for name in cells()}  # each cell's metrics.json once
    cell = read.get
    lines, dense = [], cell("dense")
    for other, label in (("svd", "plain weight SVD"), ("asvd", "whitened weight SVD")):
        pairs = [(cell(f"rom-{k}"), cell(f"{other}-{k}")) for k in KEEPS]
        pairs = [(a, b) for a, b in pairs if a and b]
        if pairs:
            acc = sum(a[1] > b[1] for a, b in pairs)
            ppl = sum(a[0] < b[0] for a, b in pairs)
            lines.append(f"Feature space (rom) against {label} ({other}): higher mean accuracy at {acc} of "
                         f"{len(pairs)} budgets, lower perplexity at {ppl} of {len(pairs)}.")
    for keep in sorted(KEEPS, reverse=True):
        got = {m: c for m in ("svd", "asvd", "rom", "rom+search") if (c := cell(f"{m}-{keep}"))}
        if len(got) < 2:
            continue
        by_acc = sorted(got, key=lambda m: -got[m][1])
        by_ppl = sorted(got, key=lambda m: got[m][0])
        ref = f" (dense: ppl {fmt(dense[0])}, mean acc {dense[1]:.3f})" if dense else ""
        lines.append(f"At {float(keep):.0%} of the parameters{ref}: by mean accuracy "
                     + " > ".join(f"{m} {got[m][1]:.3f}" for m in by_acc) + "; by perplexity "
                     + " < ".join(f"{m} {fmt(got[m][0])}" for m in by_ppl) + ".")
    return lines


def quant_reading(root: Path) -> list[str]:
    """How much each kept 80% model loses to quantization, against the dense model: ratios to its own FP, then
    per cell whether the low-rank models lose relatively less than dense, and whether they still end worse."""
    from s2d.report.markdown import fmt

    ppl = quant_ppl(root)
    lines = [f"{name}: quantized ppl over its own FP ppl: "
             + ", ".join(f"{k} ×{p[k] / p['FP']:.2f}" for k in QUANT_CELLS[1:] if k in p) + "."
             for name, p in ppl.items()]
    dense = ppl.get("dense")
    if dense is None:
        return lines
    for cell in QUANT_CELLS[1:]:
        low = {n: p for n, p in ppl.items() if n != "dense" and cell in p}
        if cell not in dense or not low:
            continue
        less = [n for n, p in low.items() if p[cell] / p["FP"] < dense[cell] / dense["FP"]]
        better = [n for n, p in low.items() if p[cell] < dense[cell]]
        lines.append(f"{cell}: {len(less)} of {len(low)} low-rank models lose relatively less than dense "
                     f"({', '.join(less) or 'none'}); in absolute perplexity {len(better)} of {len(low)} end below "
                     f"dense's {fmt(dense[cell])} ({', '.join(f'{n} {fmt(p[cell])}' for n, p in low.items())})"
                     + (f"; every model is broken here (ppl ≥ {fmt(worst)}, over 100× dense FP), so this ordering "
                        "carries little" if (worst := min(p[cell] for p in ppl.values() if cell in p))
                        > 100 * dense["FP"] else "") + ".")
    return lines
