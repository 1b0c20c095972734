"""Training curves: one small figure per quantity, over optimizer steps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from s2d.report.figures import save_figure  # noqa: E402


def plot_curve(history: list[dict], key: str, path: Path, title: str, log: bool = False) -> Path:
    """Plot `key` from a list of per-step records against "step"; writes a PNG."""
    steps = [h["step"] for h in history if h.get(key) is not None]
    values = [h[key] for h in history if h.get(key) is not None]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(steps, values, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    if log and values and min(values) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
