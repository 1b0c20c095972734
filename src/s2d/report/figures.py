"""Shared by every figure: the non-interactive backend, and an atomic save."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path, dpi: float | None = None) -> Path:
    """Lay out, render to memory, write atomically (so a kill or a full disk never leaves half a PNG), close."""
    import io

    from s2d.io import atomic_write_bytes

    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
