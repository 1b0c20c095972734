"""Atomic training checkpoints: weights as safetensors, the rest as a weights-only torch file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from s2d.errors import S2DError
from s2d.io import atomic_dir

STATE_FILE = "trainer_state.pt"


def save_checkpoint(folder: Path, model, optimizer, scheduler, reg, step: int, meta: dict) -> Path:
    """Write checkpoint `folder` in one rename: model, optimizer, schedule, regularizer and RNG state."""
    with atomic_dir(folder) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights, unlike save_file
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "reg": reg.state_dict() if reg is not None else None, "rng": torch.get_rng_state()},
                   tmp / STATE_FILE)
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    return folder


def _checkpoints(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if p.name.split("-")[1].isdigit()),
                  key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = _checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    import shutil

    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, scheduler, reg, meta: dict) -> int:
    """Restore everything saved by `save_checkpoint`; returns the step to continue from."""
    try:
        saved = json.loads((folder / "meta.json").read_text())
        for key in ("model", "world_size", "n_parameters"):
            if saved.get(key) != meta.get(key):
                raise S2DError(f"checkpoint {folder} was written for {key}={saved.get(key)!r}, but this run has "
                               f"{meta.get(key)!r}; resume with the same model and world size, or start afresh")
        load_model(model, str(folder / "model.safetensors"))
        state = torch.load(folder / STATE_FILE, weights_only=True)  # never unpickle arbitrary objects
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
        raise S2DError(f"checkpoint {folder} is unreadable ({err}); delete it to resume from an earlier one") from err
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if reg is not None and state["reg"] is not None:
        reg.load_state_dict(state["reg"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])
