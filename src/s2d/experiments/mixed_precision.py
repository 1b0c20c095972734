"""Reading the mixed-precision sweep (bench/mixed_precision.py runs it): one finished `s2d quantize --avg-bits B`
run folder per budget, named by the budget ("4", "4.5", ...)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from s2d.experiments.record import metrics


def folder_name(budget: float) -> str:
    return f"{budget:g}"


def cell(folder: Path) -> dict | None:
    """The budget's perplexity (and FP's), average bits achieved and which Linears were raised; None until its run
    has finished."""
    m = metrics(folder)
    if not m or not m.get("complete"):
        return None
    (key, entry), = [(k, v) for k, v in m["results"].items() if k != "FP"]
    (task, fp), = m["results"]["FP"]["eval"].items()
    q, mixed = entry["eval"][task], entry.get("mixed") or {}
    raised = mixed.get("layer_schemes", {})
    return {"cell": key, "task": task, "fp_ppl": fp["ppl"], "ppl": q["ppl"], "n_tokens": q["n_tokens"],
            "ratio": q["ppl"] / fp["ppl"], "budget": mixed.get("budget"), "high_scheme": mixed.get("high_scheme"),
            "average_bits": entry["average_bits"], "raised": len(raised), "linears": len(mixed.get("sensitivity", {})),
            # by module name (q_proj, down_proj, ...): which kinds of Linear the sensitivities favoured
            "raised_by_kind": dict(Counter(n.rpartition(".")[2] for n in raised).most_common()),
            "base_kl": mixed.get("base_kl"), "quantize_seconds": entry["seconds"],
            "allocation_seconds": mixed.get("seconds")}


def finished(root: Path, budgets) -> dict[str, dict]:
    return {name: c for b in budgets if (c := cell(root / (name := folder_name(b)))) is not None}


def table(root: Path, budgets) -> str:
    """The sweep as Markdown: budget, average bits achieved, Linears raised, perplexity and its ratio to FP."""
    cells = finished(root, budgets)
    if not cells:
        return "(no budget has finished)"
    first = next(iter(cells.values()))
    head = [f"{first['cell']} raised to {first['high_scheme']} by measured sensitivity; {first['task']} perplexity, "
            f"FP {first['fp_ppl']:.2f}, {first['n_tokens']:,} tokens scored.", "",
            "| budget | avg W bits | avg A bits | Linears raised | ppl | × FP | raised, by kind |",
            "|---|---|---|---|---|---|---|"]
    rows = [f"| {name} | {c['average_bits']['w']:.2f} | {c['average_bits']['a']:.2f} | {c['raised']}/{c['linears']} | "
            f"{c['ppl']:.2f} | {c['ratio']:.2f}× | "
            f"{', '.join(f'{k} {n}' for k, n in c['raised_by_kind'].items()) or '-'} |" for name, c in cells.items()]
    missing = [folder_name(b) for b in budgets if folder_name(b) not in cells]
    tail = ["", f"Not finished when this was generated: {', '.join(missing)}."] if missing else []
    return "\n".join(head + rows + tail)
