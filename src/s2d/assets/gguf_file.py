"""GGUF files in: a `.gguf` of a decoder family s2d supports, dequantized once into a cached safetensors folder.

Like the packaged SmolLM2, a GGUF file is read once through transformers' GGUF reader and saved as a plain
transformers folder (float32 safetensors, the tokenizer, a manifest) under `<cache>/models/gguf-v<version>/`,
one folder per source path. The manifest records the file's size and modification time: a file changed since
(or a folder left incomplete) is converted again, the new folder replacing the old in one rename, so a stale or
half-written conversion is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

from s2d.errors import S2DError
from s2d.io import atomic_dir, cache_root

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MANIFEST = "s2d-cache.json"


def find_gguf(spec: Path) -> Path | None:
    """The GGUF file a model spec names: a `.gguf` file, or the only one in a folder without config.json."""
    if spec.is_file():
        return spec if spec.suffix.lower() == ".gguf" else None
    if not spec.is_dir() or (spec / "config.json").is_file():
        return None
    found = sorted(p for p in spec.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (" …" if len(found) > 4 else "")
        raise S2DError(f"{spec} holds {len(found)} GGUF files ({names}); pass the path of the one to load")
    return found[0] if found else None


def readable_architectures() -> dict[str, str]:
    """{GGUF architecture: s2d family} for the families s2d supports that transformers' GGUF reader loads."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from s2d.arch.families import GGUF_ARCHS

    return {entry["arch"]: family for family, entry in GGUF_ARCHS.items()
            if entry["arch"] in GGUF_SUPPORTED_ARCHITECTURES}


def read_header(path: Path) -> dict:
    """{"architecture", "tensor_types", "tensors"} of a GGUF file; a damaged or unsupported file is an S2DError.

    gguf's reader maps every tensor, so a file cut short fails here, before any conversion starts.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(os.fspath(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError as err:
        raise S2DError(f"{path} has no general.architecture in its metadata, so it is not a model GGUF file") from err
    except Exception as err:  # ValueError (bad magic, a tensor past the end of the file), IndexError, OSError
        raise S2DError(f"cannot read {path} as a GGUF file: {err}. The file may be truncated or corrupt: copy or "
                       "convert it again") from err
    readable = readable_architectures()
    if arch not in readable:
        raise S2DError(f"{path} holds a {arch!r} model; s2d reads GGUF files of the {', '.join(readable)} "
                       "architectures (the decoder families s2d supports that transformers' GGUF reader loads)")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"architecture": arch, "tensor_types": dict(types.most_common()),
            "tensors": [t.name for t in reader.tensors]}


def config_overrides(header: dict) -> dict:
    """Config switches a GGUF file states only through its tensors, as llama.cpp reads them: a llama (or Gemma3)
    file with `blk.N.attn_q.bias` has biased attention Linears, which transformers' GGUF reader would build
    without (and drop the biases). Such biases come, for one, from `s2d compress --method rom`, merged."""
    from s2d.arch.families import BIAS_SWITCHES, GGUF_TENSORS

    family = readable_architectures().get(header["architecture"])
    present = {name.split(".")[2] for name in header["tensors"] if name.startswith("blk.") and name.endswith(".bias")}
    return {switch: True for switch, roles in BIAS_SWITCHES.get(family, {}).items()
            if any(GGUF_TENSORS.get(role) in present for role in roles)}


def stamp(path: Path) -> dict:
    """What says a file changed: its size and modification time."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_dir(path: Path) -> Path:
    """The cache folder of a GGUF file: its name plus a hash of its absolute path."""
    resolved = str(path.resolve())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
    key = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"gguf-v{CACHE_VERSION}" / f"{name}-{key}"


def manifest(folder: Path) -> dict | None:
    """The manifest of a cache folder whose files are all there at their recorded sizes, else None."""
    try:
        record = json.loads((folder / MANIFEST).read_text())
        sizes = record["sizes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    complete = all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items())
    return record if complete and record.get("version") == CACHE_VERSION else None


def source_record(path: Path, record: dict) -> dict:
    """What a run folder records about a model read from a GGUF file."""
    return {"format": "gguf", "path": str(path), "architecture": record["architecture"],
            "tensor_types": record["tensor_types"]}


def convert(path: Path, folder: Path, header: dict, source_stamp: dict) -> dict:
    """Dequantize the GGUF file at `path` into the cache folder `folder` (atomically); returns its manifest."""
    import torch

    from s2d.assets.hf import pretrained_gguf

    t0 = time.time()
    log.info("converting %s to a cached safetensors folder once; later loads use %s", path.name, folder)
    gguf_model, tokenizer = pretrained_gguf(path, torch.float32, **config_overrides(header))
    unread = _unread_tensors(gguf_model, header)
    if unread:
        raise S2DError(f"{path} holds tensors transformers' GGUF reader does not load ({', '.join(unread[:3])}"
                       f"{' …' if len(unread) > 3 else ''}), so the model it builds would not be the file's; s2d "
                       "refuses it rather than drop them")
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuilt from the config, the model keeps no trace of the GGUF quantizer: the cache is a plain folder.
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model
    record = {"version": CACHE_VERSION, "source": str(path), **source_stamp,
              "architecture": header["architecture"], "tensor_types": header["tensor_types"]}
    with atomic_dir(folder) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["sizes"] = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2))
    log.info("%s converted in %.1f s", path.name, time.time() - t0)
    return record


def _unread_tensors(model, header: dict) -> list[str]:
    """The file's tensors that transformers' GGUF reader maps to no parameter of `model` (and so drops)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )
    except ImportError:  # a transformers without the legacy reader: nothing to compare against
        return []
    processor = TENSOR_PROCESSORS.get(header["architecture"], TensorProcessor)(config=model.config.to_dict())
    mapped = get_gguf_hf_weights_map(model, processor)
    return [name for name in header["tensors"] if name not in mapped]
