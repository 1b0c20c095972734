"""The quantize report: the scheme × method table per metric, a perplexity figure, and per-Linear SQNR."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from s2d.report.document import Document  # noqa: E402
from s2d.report.figures import save_figure  # noqa: E402

FLATTERS = ("SmolLM2's packaged weights were already 4-bit (Q4_1, group 32) before dequantization, so weight-only "
            "4-bit numbers on it are flattering: the grid is partly the one the weights came from.")


def metric_of(entry: dict, task: str) -> float | None:
    r = entry["eval"].get(task)
    if r is None:
        return None
    return r.get("ppl", r.get("acc"))


def grid(rows: dict, schemes, methods, task: str) -> list[list]:
    """Rows FP + schemes, columns methods: the task's ppl (or accuracy) per cell."""
    fp = metric_of(rows["FP"], task)
    table = [["FP", *([fp] * len(methods))]]
    for scheme in schemes:
        table.append([scheme, *[metric_of(rows[f"{scheme} {m}"], task) if f"{scheme} {m}" in rows else None
                                for m in methods]])
    return table


def plot_grid(rows: dict, schemes, methods, task: str, path):
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(schemes) + 2), 3.8), dpi=110)
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        values = [metric_of(rows[f"{s} {method}"], task) if f"{s} {method}" in rows else None for s in schemes]
        ax.bar([i + j * width for i in range(len(schemes))], [v if v and math.isfinite(v) else 0 for v in values],
               width=width, label=method)
    fp = metric_of(rows["FP"], task)
    if fp:
        ax.axhline(fp, color="k", linestyle="--", linewidth=1, label=f"FP {fp:.3g}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(schemes))], schemes)
    if task.startswith("ppl"):
        ax.set_yscale("log")
    ax.set_ylabel(task)
    ax.set_title(f"{task} by scheme and method")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def write_quant_report(run, model_spec: str, config, rows: dict) -> dict:
    doc = Document(f"s2d quantize: {model_spec}")
    schemes, methods = list(config.schemes), list(config.methods)
    tasks = list(rows["FP"]["eval"])
    if "smollm2" in str(model_spec).lower() and any(s.startswith("W4") or s.startswith("W3") for s in schemes):
        doc.paragraph(FLATTERS)
    for task in tasks:
        n = rows["FP"]["eval"][task].get("n_tokens", rows["FP"]["eval"][task].get("n"))
        doc.heading(f"{task} ({'tokens' if task.startswith('ppl') else 'examples'}: {n:,})")
        doc.table(["scheme", *methods], grid(rows, schemes, methods, task), f"grid-{task}")
    figures = {}
    if len(schemes) * len(methods) > 1:
        first = tasks[0]
        figures["grid"] = plot_grid(rows, schemes, methods, first, run.figure_path("grid.png"))
        doc.figure(figures["grid"], f"{first} for every scheme and method; dashed: full precision.")
    for key, entry in rows.items():
        if key == "FP" or "sqnr" not in entry:
            continue
        doc.heading(f"{key}: per-Linear SQNR")
        doc.table(["Linear", "role", "local dB", "accumulated dB"],
                  [[name, v["role"], v["local_db"], v["accumulated_db"]] for name, v in entry["sqnr_worst"]],
                  f"sqnr-{key}")
        path = run.figure_path(f"sqnr_{entry['scheme']}_{entry['method'].replace('+', '-')}.png")
        doc.figure(path, f"{key}: SQNR of each quantized Linear's output against full precision (local: same input; "
                         "accumulated: the full-precision model's output at that Linear).")
    doc.heading("How this was made")
    doc.code(run.command_line(f"quantize {model_spec}"))
    return {"markdown": run.write_text("report.md", doc.markdown(run.path)),
            "html": run.write_text("report.html", doc.html()), **figures}


def plot_sqnr(sqnr: dict[str, dict], path, title: str = "") -> None:
    """Local and accumulated SQNR per quantized Linear, in model order, one colour per role."""
    names = list(sqnr)
    roles = sorted({v["role"] for v in sqnr.values()})
    colours = {r: plt.cm.tab10(i % 10) for i, r in enumerate(roles)}
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(names) * 0.05 + 4), 6), sharex=True)
    for ax, key, label in ((axes[0], "local_db", "local SQNR (dB)"), (axes[1], "accumulated_db", "accumulated (dB)")):
        for role in roles:
            xs = [i for i, n in enumerate(names) if sqnr[n]["role"] == role]
            ys = [_finite(sqnr[names[i]][key]) for i in xs]
            ax.scatter(xs, ys, s=10, color=colours[role], label=role)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(ncol=len(roles), fontsize=7, loc="lower left")
    axes[1].set_xlabel("quantized Linear, in model order")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _finite(v: float) -> float:
    return 200.0 if math.isinf(v) else min(v, 200.0)  # a noiseless layer's ceiling would squash the axis
