"""Atomic training checkpoints: weights as safetensors, the rest as a weights-only torch file, and the run's
record so far (loss history, evaluations, regularizer log) as JSON, all written in one rename."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from s2d.errors import S2DError
from s2d.io import atomic_dir, nbytes

STATE_FILE = "trainer_state.pt"
RECORD_FILE = "record.json"
RECORD_KEYS = ("history", "evals", "reg_log")

# What a damaged checkpoint raises: truncated or empty files (EOFError, SafetensorError, zip errors), missing
# files, bad JSON, and state that parses but has the wrong keys or types for this run.
_UNREADABLE = (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, SafetensorError,
               pickle.UnpicklingError)


def save_checkpoint(folder: Path, model, optimizer, scheduler, reg, step: int, meta: dict,
                    record: dict | None = None) -> Path:
    """Write checkpoint `folder` in one rename: model, optimizer, schedule, regularizer and RNG state, and
    `record` (lists of JSON-able dicts under RECORD_KEYS), so a resumed run's record is the whole run's."""
    record = {key: list((record or {}).get(key, [])) for key in RECORD_KEYS}
    # Adam keeps two moments per weight: about three times the model.
    with atomic_dir(folder, needed=3 * nbytes(model.state_dict().values())) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights, unlike save_file
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "reg": reg.state_dict() if reg is not None else None, "rng": torch.get_rng_state()},
                   tmp / STATE_FILE)
        (tmp / RECORD_FILE).write_text(json.dumps(record))  # Python's float repr round-trips bit for bit
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    return folder


def _step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def _checkpoints(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if p.name.split("-")[1].isdigit()), key=_step)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest `step-N` folder under `root`, or None."""
    found = _checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, scheduler, reg, meta: dict) -> tuple[int, dict]:
    """Restore everything saved by `save_checkpoint`; returns the step to continue from and the record (empty
    lists for a checkpoint written before records were kept). A damaged checkpoint raises S2DError."""
    try:
        saved = json.loads((folder / "meta.json").read_text())
        if not isinstance(saved, dict):
            raise ValueError("meta.json does not hold a JSON object")
        for key in ("model", "world_size", "n_parameters"):
            if saved.get(key) != meta.get(key):
                raise S2DError(f"checkpoint {folder} was written for {key}={saved.get(key)!r}, but this run has "
                               f"{meta.get(key)!r}; resume with the same model and world size, or start afresh")
        record = _read_record(folder)
        state = torch.load(folder / STATE_FILE, weights_only=True)  # never unpickle arbitrary objects
        load_model(model, str(folder / "model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if reg is not None and state["reg"] is not None:
            reg.load_state_dict(state["reg"])
        torch.set_rng_state(state["rng"])
        return int(state["step"]), record
    except _UNREADABLE as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())  # some loaders' messages span lines
        raise S2DError(f"checkpoint {folder} is unreadable ({reason}); {_remedy(folder)}") from err


def _read_record(folder: Path) -> dict:
    path = folder / RECORD_FILE
    if not path.exists():
        return {key: [] for key in RECORD_KEYS}
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or not all(isinstance(record.get(key), list) for key in RECORD_KEYS):
        raise ValueError(f"{RECORD_FILE} does not hold the lists {', '.join(RECORD_KEYS)}")
    return record


def _remedy(folder: Path) -> str:
    """What to do about a damaged checkpoint: fall back to the previous one if there is one."""
    earlier = [p for p in _checkpoints(folder.parent) if _step(p) < _step(folder)]
    if earlier:
        return (f"delete that folder to resume from the previous checkpoint {earlier[-1]}, "
                "or start afresh in a new run folder")
    return "delete that folder to start the run afresh, or use a new run folder"
