"""`s2d.load_model`: any model assets can find, plus the folders that `s2d compress` and `s2d quantize` wrote.

Restoring those is the command layer's job: assets knows where models come from, the methods know their own
file formats (s2d.lowrank.io, s2d.quant.io), and this module joins the two.
"""

from __future__ import annotations

import json
from pathlib import Path

from s2d.assets import models


def _restore(folder: Path, config, model_class, dtype, load_plain):
    """Rebuild a low-rank folder from its factors, or load a quantized one's float part; then swap its
    QuantLinears back in (a compressed model may also be quantized)."""
    raw = json.loads((folder / "config.json").read_text())
    if "low_rank" in raw:
        from s2d.lowrank.io import load

        model = load(folder, config, model_class, dtype)
    else:
        model = load_plain()
    if "quantization" in raw:
        from s2d.quant.io import restore

        restore(model, folder)
    return model


def load_model(spec, **kwargs):
    """(model, tokenizer or processor) for a name, `tiny:<family>`, a local HF folder, a .gguf file or an s2d
    output folder."""
    return models.load_model(spec, restore=_restore, **kwargs)


def source_of(model) -> dict:
    """{"source": ...} for a run's metrics.json when the model was converted from a file on load (a GGUF: its
    path, architecture and tensor types, e.g. {"Q4_1": 210, "F32": 61}); {} otherwise."""
    record = getattr(model, "s2d_source", None)
    return {"source": record} if record else {}
