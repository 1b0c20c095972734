"""Atomic writes: a crash or a full disk mid-write never leaves a half-written output."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from s2d.errors import S2DError


def _fail(path: Path, err: Exception, written: int | None = None, free: int | None = None,
          needed: int | None = None) -> S2DError:
    if disk_full(err, path):
        free = _free(path) if free is None else free
        done = f"about {_human(needed)} were needed, " if needed else \
            f"{_human(written)} had been written when it filled, " if written else ""
        return S2DError(f"the disk is full (No space left on device): could not write {path} ({done}"
                        f"{_human(free)} free there). Free some space or pass --out on another disk; the "
                        "previous contents of that path are intact.")
    return S2DError(
        f"could not write {path}: {getattr(err, 'strerror', None) or err}. Check that the folder is writable and "
        "the disk has space; nothing was overwritten."
    )


def disk_full(err: BaseException, path: Path | None = None) -> bool:
    """ENOSPC, however the writer reports it: OSError, the text of safetensors' and torch.save's errors, or (as
    torch's zip writer says only "unexpected pos") a write error with the disk at `path` all but full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if any(s in text for s in ("No space left", "StorageFull", "os error 28", "file write failed", "unexpected pos")):
        return True
    return path is not None and isinstance(err, OSError | RuntimeError) and _free(path) < 1 << 20


def _free(path: Path) -> int:
    folder = next((p for p in (path, *path.parents) if p.exists()), Path.cwd())
    return shutil.disk_usage(folder).free


def _human(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _fail(path, err) from err
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _fail(path, err, needed=len(data)) from err
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    """Always valid JSON: NaN and Inf, which json.dumps would write as bare tokens, become null."""
    text = json.dumps(nulled(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return nulled(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def nbytes(tensors) -> int:
    """Bytes of an iterable of tensors (what saving them will need on disk, give or take headers)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def atomic_dir(path: str | Path, needed: int | None = None):
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    `needed` (bytes, an estimate of what will be written) makes a full disk's error say how much was needed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())
    except OSError as err:
        raise _fail(path, err) from err
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        written, free = _size(tmp), _free(tmp)  # measured before the partial output is removed
        full = isinstance(err, Exception) and not isinstance(err, S2DError) and disk_full(err, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) or full:  # safetensors and torch.save do not raise OSError for a full disk
            raise _fail(path, err, written, free, needed) from err
        raise


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary file path beside `path` for a writer that opens files by name; on success it replaces
    `path` in one rename, on any failure (the caller's checks included) it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())
    except OSError as err:
        raise _fail(path, err) from err
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        full = isinstance(err, Exception) and not isinstance(err, S2DError) and disk_full(err, path.parent)
        if isinstance(err, OSError) or full:
            raise _fail(path, err, written) from err
        raise


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove it is writable, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".s2d-probe.", delete=True)
        probe.close()
    except OSError as err:
        raise S2DError(
            f"output folder {path} is not writable ({err.strerror or err}); pass --out with a folder you can write to."
        ) from err
    return path


def cache_root() -> Path:
    """Where s2d keeps caches: $S2D_CACHE, else $XDG_CACHE_HOME/s2d, else ~/.cache/s2d."""
    env = os.environ.get("S2D_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "s2d"


def non_finite(obj, where: str = "") -> list[tuple[str, float]]:
    """Every NaN or Inf number in a nested dict/list, with its dotted path."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [(where or "value", obj)]
    if isinstance(obj, dict):
        return [hit for k, v in obj.items() for hit in non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list | tuple):
        return [hit for i, v in enumerate(obj) for hit in non_finite(v, f"{where}[{i}]")]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return non_finite(float(obj.item()), where)
    return []


def nulled(obj):
    """A copy of a nested dict/list with every NaN or Inf number replaced by None (JSON null)."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()  # numpy and torch scalars: their Python value, int or float
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: nulled(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nulled(v) for v in obj]
    return obj
