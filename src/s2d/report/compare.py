"""`s2d compare`: rank models by outlier severity in one table and one figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from s2d.report.document import Document  # noqa: E402
from s2d.report.figures import save_figure  # noqa: E402

COLUMNS = (("max_abs", "max |x|"), ("mean_kurtosis", "mean kurtosis"), ("massive_count", "massive entries"),
           ("sigma1_p50", "σ₁ p50"), ("sigma1_p90", "σ₁ p90"), ("sigma1_p99", "σ₁ p99"), ("sigma1_max", "σ₁ max"))


def rank(severities: dict[str, dict]) -> list[tuple[str, dict]]:
    """Most severe first: by max|x|, then mean kurtosis."""
    return sorted(severities.items(), key=lambda kv: (kv[1]["max_abs"], kv[1]["mean_kurtosis"]), reverse=True)


def plot_compare(ranked: list[tuple[str, dict]], path: Path) -> Path:
    keys = (("max_abs", "max |x|"), ("mean_kurtosis", "mean kurtosis"), ("sigma1_p99", "σ₁ p99"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), dpi=110)
    names = [Path(name).name[-24:] if "/" in name else name for name, _ in ranked]  # folders by their last part
    for ax, (key, label) in zip(axes, keys, strict=True):
        ax.barh(names[::-1], [sev[key] for _, sev in ranked][::-1], color="C3")
        ax.set_xscale("log")
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Outlier severity (most severe on top)")
    return save_figure(fig, path)


def write_compare_report(run, severities: dict[str, dict], details: dict[str, dict], command: str) -> dict:
    ranked = rank(severities)
    figure = plot_compare(ranked, run.figure_path("compare.png"))
    doc = Document("s2d compare: outlier severity")
    worst, best = ranked[0][0], ranked[-1][0]
    doc.paragraph(f"{worst} has the most severe outliers (max|x| {ranked[0][1]['max_abs']:.3g}, mean kurtosis "
                  f"{ranked[0][1]['mean_kurtosis']:.3g}); {best} the mildest (max|x| {ranked[-1][1]['max_abs']:.3g}, "
                  f"mean kurtosis {ranked[-1][1]['mean_kurtosis']:.3g}).", lead=True)
    doc.table(["rank", "model", "family", "samples × tokens", *[label for _, label in COLUMNS]],
              [[i + 1, name, details[name]["family"], details[name]["data"], *[sev[k] for k, _ in COLUMNS]]
               for i, (name, sev) in enumerate(ranked)], "headline")
    doc.figure(figure, "max|x|, mean kurtosis of Linear outputs, and the 99th percentile of σ₁ per model.")
    doc.heading("How this was made")
    doc.code(command)
    return {"markdown": run.write_text("report.md", doc.markdown(run.path)),
            "html": run.write_text("report.html", doc.html()), "figure": figure}
