"""The run folder every command writes: config.yaml, metrics.json, reports and figures, all atomically."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import yaml

from s2d.errors import S2DError
from s2d.io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir, non_finite
from s2d.version import __version__

log = logging.getLogger(__name__)


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


MODES = ("new", "overwrite", "resume")
LOCK = ".s2d.lock"
PREVIOUS = ".s2d-previous"  # an overwritten run waits here until the new one has finished


def run_mode(overwrite: bool = False, resume: bool = False) -> str:
    """The run-folder mode for the --overwrite and --resume flags."""
    if overwrite and resume:
        raise S2DError("--overwrite and --resume exclude each other: resume continues a run, overwrite replaces it")
    return "overwrite" if overwrite else "resume" if resume else "new"


class RunFolder:
    """One command's outputs. Create it before long work so an unwritable folder fails fast.

    The folder is locked while the command runs, so a second writer fails at once. A non-empty folder is
    refused unless the mode is "overwrite" (the old run is kept aside until the new one finishes, and put back
    if it fails) or "resume" (a resumable command continues what is there). Used as a context manager, it
    settles the folder on exit: success drops the old run, failure restores it.
    """

    def __init__(self, path: str | Path, command: str, config: dict[str, Any], seed: int | None = None, *,
                 mode: str = "new", resumable: bool = False, argv: list[str] | None = None):
        import torch

        if mode not in MODES:
            raise S2DError(f"unknown run-folder mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "resume" and not resumable:
            raise S2DError(f"`s2d {command}` cannot resume; pass --overwrite to replace the run in {path}")
        self.path = ensure_writable_dir(path)
        self.mode, self.resumable = mode, resumable
        self._lock = _lock(self.path)
        self._created = not any(e.name != LOCK for e in self.path.iterdir())
        remove_leftovers(self.path)
        self._settle_previous()
        self._previous = self._stage_previous() if mode == "overwrite" else None
        existing = _entries(self.path)
        if existing and mode == "new":
            self._release()
            shown = ", ".join(sorted(e.name for e in existing)[:4])
            hint = " or --resume to continue it" if resumable else ""
            raise S2DError(f"{self.path} already holds a run ({shown}); pass --overwrite to replace it{hint}, "
                           "or choose another --out")
        self.figures = self.path / "figures"
        self.command = command
        self.argv = list(argv) if argv is not None else []  # the CLI's; the Python API records none
        self.config = {"command": command, "argv": self.argv, "seed": seed, "config": config,
                       "versions": versions(), "threads": torch.get_num_threads(),  # wall times depend on it
                       "created": _dt.datetime.now().isoformat(timespec="seconds")}
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """metrics.json; a NaN or Inf anywhere in it is an S2DError instead (and an earlier metrics.json stays)."""
        check_metrics(metrics, self.path)
        return atomic_write_json(self.path / "metrics.json", metrics)

    def command_line(self, fallback: str) -> str:
        """The command that made this run, as a user would type it (`s2d <fallback>` for Python API runs)."""
        import shlex

        return "s2d " + (" ".join(shlex.quote(a) for a in self.argv) if self.argv else fallback)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    def write_bytes(self, name: str, data: bytes) -> Path:
        return atomic_write_bytes(self.path / name, data)

    def figure_path(self, name: str) -> Path:
        self.figures.mkdir(parents=True, exist_ok=True)
        return self.figures / name

    # -- settling the folder -------------------------------------------------------------------------------

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.close()
            return
        # A resumable run keeps what it got done (checkpoints, finished cells); anything else is undone.
        # An overwrite that fails puts the earlier run back, resumable or not: that run was complete.
        kept = self.resumable and self._previous is None and any(e.name != "config.yaml" for e in _entries(self.path))
        if not kept:
            self._discard()
        self._release()
        if issubclass(kind, KeyboardInterrupt):
            raise Interrupted(self.path, resumable=kept) from err

    def close(self) -> None:
        """The run finished: drop the run it replaced and unlock the folder."""
        shutil.rmtree(self.path / PREVIOUS, ignore_errors=True)
        self._release()

    def _discard(self) -> None:
        """A failed run that cannot resume leaves nothing half-written: its files go, the old run comes back."""
        for entry in _entries(self.path):
            _remove(entry)
        if (self.path / PREVIOUS).is_dir():
            _restore(self.path)
        elif self._created:
            (self.path / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def _settle_previous(self) -> None:
        """A run killed while it overwrote another left the old one aside: resuming keeps the killed run,
        anything else puts the old one back."""
        if not (self.path / PREVIOUS).is_dir():
            return
        if self.mode == "resume":
            shutil.rmtree(self.path / PREVIOUS)
            log.warning("%s: continuing the interrupted run; the run it was replacing is deleted", self.path)
            return
        for entry in _entries(self.path):
            _remove(entry)
        _restore(self.path)
        log.warning("%s: an interrupted run had been replacing this one; the earlier run is restored", self.path)

    def _stage_previous(self) -> Path | None:
        existing = _entries(self.path)
        if not existing:
            return None
        aside = self.path / PREVIOUS
        aside.mkdir()
        for entry in existing:
            os.replace(entry, aside / entry.name)
        return aside

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None


def check_metrics(metrics: dict[str, Any], where: str | Path = "") -> None:
    """Refuse NaN/Inf results: they mean the model's outputs overflowed, and no table should show them."""
    bad = non_finite(metrics)
    if bad:
        path, value = bad[0]
        raise S2DError(f"metric {path} is {value} ({len(bad)} non-finite value(s) in all): the model's outputs "
                       f"overflowed or are NaN, so nothing was recorded{f' in {where}' if where else ''}. Check the "
                       "model with `s2d diagnose`, or use more bits or another quantization method")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a run: says whether the run folder kept what is needed to resume."""

    def __init__(self, path: Path, resumable: bool):
        super().__init__(str(path))
        self.path, self.resumable = path, resumable


def _entries(path: Path) -> list[Path]:
    return [e for e in path.iterdir() if e.name not in (LOCK, PREVIOUS)]


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _restore(path: Path) -> None:
    aside = path / PREVIOUS
    for entry in aside.iterdir():
        os.replace(entry, path / entry.name)
    aside.rmdir()


def _lock(path: Path):
    """Hold an exclusive lock on the run folder for the life of the command; a second writer fails at once."""
    import fcntl

    handle = open(path / LOCK, "a+")  # noqa: SIM115 - kept open on purpose: the lock lives as long as the file
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise S2DError(f"{path} is in use by another s2d run ({owner}); wait for it to finish, or choose another "
                       "--out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the temporary files and folders a killed write left in a run folder (`.name.*.tmp`), and say so.

    Only called with the folder's lock held, so no live writer owns them.
    """
    found = [p for p in path.rglob(".*") if p.name.endswith((".tmp", ".old")) and p.name != LOCK]
    found = [p for p in found if not any(parent in found for parent in p.parents)]
    if not found:
        return []
    size = sum(f.stat().st_size for p in found for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    for p in found:
        _remove(p)
    names = ", ".join(str(p.relative_to(path)) for p in found[:3]) + (" …" if len(found) > 3 else "")
    log.warning("%s: removed %d leftover(s) of an interrupted write (%s; %.1f MB)", path, len(found), names,
                size / 2**20)
    return found
