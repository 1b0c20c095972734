"""The run folder every command writes: config.yaml, metrics.json, reports and figures, all atomically."""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from pathlib import Path
from typing import Any

import yaml

from s2d import __version__
from s2d.io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"s2d": __version__, "torch": str(torch.__version__), "transformers": str(transformers.__version__),
            "python": platform.python_version()}


def recorded_threads(folder: str | Path) -> int | None:
    """The torch thread count a run folder recorded (None for folders written before it was recorded)."""
    path = Path(folder) / "config.yaml"
    return yaml.safe_load(path.read_text()).get("threads") if path.is_file() else None


def default_run_dir(command: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{command}-{stamp}"


class RunFolder:
    """One command's outputs. Create it before long work so an unwritable folder fails fast."""

    def __init__(self, path: str | Path, command: str, config: dict[str, Any], seed: int | None = None):
        import torch

        self.path = ensure_writable_dir(path)
        self.figures = self.path / "figures"
        self.command = command
        self.config = {"command": command, "argv": sys.argv[1:], "seed": seed, "config": config,
                       "versions": versions(), "threads": torch.get_num_threads(),  # wall times depend on it
                       "created": _dt.datetime.now().isoformat(timespec="seconds")}
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        return atomic_write_json(self.path / "metrics.json", metrics)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    def write_bytes(self, name: str, data: bytes) -> Path:
        return atomic_write_bytes(self.path / name, data)

    def figure_path(self, name: str) -> Path:
        self.figures.mkdir(parents=True, exist_ok=True)
        return self.figures / name
