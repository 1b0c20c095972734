"""The diagnose report: five figures, the headline and link-study tables, and the automatic reading."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from s2d.report.document import Document  # noqa: E402
from s2d.report.figures import save_figure  # noqa: E402

_ROLE_COLORS = {"q": "C0", "k": "C1", "v": "C2", "qkv": "C0", "o": "C3", "gate": "C4", "up": "C5", "down": "C6",
                "fc1": "C4", "fc2": "C6"}


def _roles(result: dict) -> list[str]:
    return list(dict.fromkeys(lin["role"] for lin in result["linears"]))


def plot_max_per_block(result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    res = result["residual"]
    ax.plot([r["block"] for r in res], [r["max_abs"] for r in res], "k-o", markersize=4, label="residual stream")
    for role in _roles(result):
        lins = [lin for lin in result["linears"] if lin["role"] == role]
        ax.plot([lin["block"] for lin in lins], [lin["output"]["max_abs"] for lin in lins], ".", alpha=0.8,
                color=_ROLE_COLORS.get(role), label=f"{role} output")
    ax.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("max |x|")
    ax.set_title("Largest activation per block")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_channel_heatmap(result: dict, path: Path) -> Path:
    import numpy as np

    grid = np.array([r["channel_absmax"] for r in result["residual"]]).T  # channels × blocks
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    image = ax.imshow(np.maximum(grid, 1e-3), aspect="auto", interpolation="nearest", cmap="magma",
                      norm=LogNorm(vmin=max(grid.min(), 1e-3), vmax=max(grid.max(), 1e-2)))
    fig.colorbar(image, ax=ax, label="absmax")
    ax.set_xlabel("block")
    ax.set_ylabel("channel")
    ax.set_title("Residual-stream absmax per channel and block")
    return save_figure(fig, path)


def plot_spectra(result: dict, path: Path, n: int = 6) -> Path:
    top = sorted(result["linears"], key=lambda lin: lin["sigma1"], reverse=True)[:n]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for lin in top:
        label = f"{lin['name']} (σ₁ {lin['sigma1']:.3g})"
        ax.plot(range(1, len(lin["sigma"]) + 1), lin["sigma"], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("index r")
    ax.set_ylabel("σ_r")
    ax.set_title(f"Singular values of the {len(top)} Linears with the largest σ₁")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_scatter(result: dict, path: Path) -> Path:
    link = result["link"]["all"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, key, label in ((axes[0], "sigma1", "σ₁"), (axes[1], "pcdr1", "PCDR₁ (mean over tokens)")):
        for role in _roles(result):
            lins = [lin for lin in result["linears"] if lin["role"] == role]
            xs = [lin["sigma1"] if key == "sigma1" else lin["pcdr"][0] for lin in lins]
            ax.scatter(xs, [lin["output"]["max_abs"] for lin in lins], s=14, alpha=0.8,
                       color=_ROLE_COLORS.get(role), label=role)
        c = link[key]
        rho = "n/a" if c["spearman"] is None else f"{c['spearman']:.2f} (p={c['spearman_p']:.1g})"
        ax.set_title(f"Spearman ρ = {rho}", fontsize=10)
        ax.set_xlabel(label)
        ax.set_ylabel("output max |x|")
        ax.set_yscale("log")
        if key == "sigma1":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_pcdr_bars(result: dict, path: Path) -> Path:
    lins = result["linears"]
    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=110)
    idx = range(len(lins))
    k = max(len(lin["pcdr"]) for lin in lins)
    ax.bar(idx, [lin["pcdr"][-1] for lin in lins], color="lightgrey", width=1.0, label=f"PCDR_{k}")
    ax.bar(idx, [lin["pcdr"][0] for lin in lins], width=1.0, color=[_ROLE_COLORS.get(lin["role"]) for lin in lins],
           label="PCDR₁ (colour = role)")
    ax.set_xlabel("Linear (in forward order)")
    ax.set_ylabel("PCDR")
    ax.set_ylim(0, max(1.05, max(lin["pcdr"][0] for lin in lins) * 1.05))
    ax.set_title("How much of each token's largest output the top components produce")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _c(c: dict) -> tuple:
    return (c["spearman"], c["spearman_p"], c["pearson"], c["pearson_p"], c["n"])


def build_document(result: dict, model: str, command: str, figures: dict[str, Path]) -> Document:
    sev, res = result["severity"], result["residual"]
    doc = Document(f"s2d diagnose: {model}")
    doc.paragraph(" ".join(result["reading"]), lead=True)
    peak = max(res, key=lambda r: r["max_abs"])
    first = next((r["block"] for r in res if r["massive_count"] > 0), None)
    doc.table(["model", "family", "samples × tokens", "max |x|", "at block", "massive entries", "first massive block",
               "mean kurtosis (Linear outputs)", "σ₁ median", "σ₁ max"],
              [[model, result["family"], f"{result['samples']} × {result['seq_len']}", sev["max_abs"], peak["block"],
                sev["massive_count"], first, sev["mean_kurtosis"], sev["sigma1_p50"], sev["sigma1_max"]]],
              "headline")
    doc.heading("Where the outliers are")
    doc.figure(figures["max"], "Figure 1. max|x| per block (log scale): residual stream and every Linear's output.")
    doc.figure(figures["heatmap"], "Figure 2. Residual-stream absmax per channel × block; a bright row is an outlier "
                                   "channel.")
    doc.table(["block", "max |x|", "kurtosis", "max/median", "|x| > 6", "massive", "top channels"],
              [[r["block"], r["max_abs"], r["kurtosis"], r["max_median_ratio"], r["over_threshold"], r["massive_count"],
                ", ".join(str(c["channel"]) for c in r["top_channels"][:4])] for r in res], "residual")
    doc.heading("The Linears with the largest outputs")
    top = sorted(result["linears"], key=lambda lin: lin["output"]["max_abs"], reverse=True)[:12]
    doc.table(["Linear", "role", "out max |x|", "out kurtosis", "in max |x|", "σ₁", "stable rank", "condition",
               "top-1 energy", "PCDR₁", "PCDR₃", "PCDR₁ at peak"],
              [[lin["name"], lin["role"], lin["output"]["max_abs"], lin["output"]["kurtosis"], lin["input"]["max_abs"],
                lin["sigma1"], lin["stable_rank"], lin["condition"], lin["energy_top"][0], lin["pcdr"][0],
                lin["pcdr"][-1], lin["pcdr_at_peak"][0] if lin["pcdr_at_peak"] else None] for lin in top], "linears")
    doc.heading("Spectra and the link study")
    doc.figure(figures["spectra"], "Figure 3. Singular values of the Linears with the largest σ₁.")
    doc.figure(figures["scatter"], "Figure 4. σ₁ and PCDR₁ against each Linear's output max|x|.")
    doc.figure(figures["pcdr"], "Figure 5. PCDR per Linear, at each token's largest output neuron.")
    rows = []
    for scope, preds in result["link"].items():
        for key, name in (("sigma1", "σ₁"), ("pcdr1", "PCDR₁"), ("pcdr3", "PCDR₃")):
            rows.append([scope, name, *_c(preds[key])])
    doc.table(["Linears", "predictor", "Spearman ρ", "p", "Pearson r", "p", "n"], rows, "link")
    doc.heading("How this was made")
    doc.code(command)
    doc.paragraph(f"Spectra took {result['seconds']['spectra']:.1f} s and the whole diagnosis "
                  f"{result['seconds']['total']:.1f} s. Every statistic is streamed: no activation is kept after its "
                  "batch. The median |x| comes from a 0.01-decade log-histogram (±1.2%).")
    return doc


def write_report(run, result: dict, model: str, command: str) -> dict[str, Path]:
    """Figures, report.md and a self-contained report.html in the run folder."""
    figures = {
        "max": plot_max_per_block(result, run.figure_path("max_per_block.png")),
        "heatmap": plot_channel_heatmap(result, run.figure_path("channel_heatmap.png")),
        "spectra": plot_spectra(result, run.figure_path("spectra.png")),
        "scatter": plot_scatter(result, run.figure_path("link_scatter.png")),
        "pcdr": plot_pcdr_bars(result, run.figure_path("pcdr.png")),
    }
    doc = build_document(result, model, command, figures)
    return {"markdown": run.write_text("report.md", doc.markdown(run.path)),
            "html": run.write_text("report.html", doc.html()), **figures}
