"""The `s2d run` report: every stage's model side by side, the cells of a sweep, and one figure of each."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from s2d.report.document import Document  # noqa: E402
from s2d.report.figures import save_figure  # noqa: E402


def metric_columns(rows: list[dict]) -> list[str]:
    """Every metric any row has, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row.get("metrics", {})))
    return list(seen)


def primary_metric(columns: list[str]) -> str | None:
    """The metric the figures show: the first perplexity, else the first metric."""
    return next((c for c in columns if c.startswith("ppl")), columns[0] if columns else None)


def _bits(value) -> str | None:
    if not value:
        return None
    return f"W{value['w']:.3g}A{value['a']:.3g}"


def _mb(size: int | None) -> float | None:
    return None if size is None else size / 2**20


def plot_metric(labels: list[str], values: list[float | None], metric: str, path: Path, title: str) -> Path:
    """One horizontal bar per model (log scale for perplexity); a missing value is an empty bar."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.4), dpi=110)
    finite = [v if v is not None and math.isfinite(v) else 0 for v in values]
    ax.barh(range(len(labels)), finite, color="#4c72b0")
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v):
            ax.text(v, i, f" {v:.4g}", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    if metric.startswith("ppl") and any(finite):
        ax.set_xscale("log")
    ax.set_xlabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def write_run_report(root: Path, title: str, models: list[dict], stages: list[dict], cells: list[dict],
                     swept: list[str], command: str) -> dict:
    """report.md and report.html in `root`, with figures/models.png (and figures/cells.png for a sweep).

    models: {"name", "stage", "params", "average_bits", "size_bytes", "seconds", "metrics"} per model;
    stages: {"folder", "stage", "seconds", "status"}; cells: {"cell", "values", "metrics", ...} per cell.
    """
    doc = Document(title)
    figures = {}
    shared = metric_columns([{"metrics": m.get("shared", {})} for m in models])
    if shared:
        doc.heading("The same evaluation on every model")
        doc.paragraph("The recipe's `evaluate:` run by `s2d eval` on each model the recipe made, the input included "
                      "(an export stage's row scores its GGUF file as transformers reads it back).")
        doc.table(["model", "made by", "parameters", "average bits", "size MiB", "seconds", *shared],
                  [[m["name"], m["stage"], m.get("params"), _bits(m.get("average_bits")), _mb(m.get("size_bytes")),
                    m.get("seconds"), *[m.get("shared", {}).get(c) for c in shared]] for m in models], "shared")
        metric = primary_metric(shared)
        figures["shared"] = plot_metric([m["name"] for m in models], [m.get("shared", {}).get(metric) for m in models],
                                        metric, root / "figures" / "shared.png", f"{metric}, the same evaluation "
                                        "on every model")
        doc.figure(figures["shared"], f"{metric} of every model on the recipe's shared evaluation.")
    columns = metric_columns(models)
    doc.heading("What each stage measured")
    doc.paragraph("Every model the recipe made, on the evaluations its stages ran (a stage's metrics go on the row "
                  "of the model it measured: an eval stage's on the model before it, quantize's full-precision "
                  "row on its input). Size is the model folder on disk; seconds the wall time of the stage that "
                  "made the model.")
    doc.table(["model", "made by", "parameters", "average bits", "size MiB", "seconds", *columns],
              [[m["name"], m["stage"], m.get("params"), _bits(m.get("average_bits")), _mb(m.get("size_bytes")),
                m.get("seconds"), *[m["metrics"].get(c) for c in columns]] for m in models], "models")
    metric = primary_metric(columns)
    if metric is not None:
        figures["models"] = plot_metric([m["name"] for m in models], [m["metrics"].get(metric) for m in models],
                                        metric, root / "figures" / "models.png", f"{metric} of each stage's model")
        doc.figure(figures["models"], f"{metric} of each stage's model.")
    if len(cells) > 1:
        cell_columns = metric_columns(cells)
        doc.heading("Cells of the sweep")
        doc.table(["cell", *swept, "parameters", "average bits", "size MiB", "seconds", *cell_columns],
                  [[c["cell"], *[c["values"].get(k) for k in swept], c.get("params"), _bits(c.get("average_bits")),
                    _mb(c.get("size_bytes")), c.get("seconds"), *[c["metrics"].get(k) for k in cell_columns]]
                   for c in cells], "cells")
        metric = primary_metric(cell_columns)
        if metric is not None:
            labels = [f"{c['cell']}: {c['label']}" for c in cells]
            figures["cells"] = plot_metric(labels, [c["metrics"].get(metric) for c in cells], metric,
                                           root / "figures" / "cells.png", f"{metric} of each cell's final model")
            doc.figure(figures["cells"], f"{metric} of each cell's final model.")
    doc.heading("Stages")
    doc.table(["folder", "stage", "status", "seconds"],
              [[s["folder"], s["stage"], s["status"], s.get("seconds")] for s in stages], "stages")
    doc.heading("How this was made")
    doc.code(command)
    from s2d.io import atomic_write_text

    return {"markdown": atomic_write_text(root / "report.md", doc.markdown(root)),
            "html": atomic_write_text(root / "report.html", doc.html()), **figures}
