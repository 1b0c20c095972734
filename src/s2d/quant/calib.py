"""Calibration batches: token ids (n x seq) or a dict of model inputs, walked in chunks to bound memory."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from s2d.errors import S2DError

CalibBatch = torch.Tensor | dict


def require_calib(calib: CalibBatch | None, what: str) -> CalibBatch:
    if calib is None:
        raise S2DError(f"{what} needs calibration data: pass calib=<token batch> (e.g. from "
                       "s2d.assets.calibration_batch) to quantize()")
    n = calib_size(calib)
    if n == 0:
        raise S2DError(f"{what} needs calibration data, but the calibration batch is empty")
    return calib


def calib_size(calib: CalibBatch) -> int:
    return next(iter(calib.values())).shape[0] if isinstance(calib, dict) else calib.shape[0]


def iter_chunks(calib: CalibBatch, chunk_size: int) -> Iterator[CalibBatch]:
    """Consecutive slices of at most `chunk_size` samples."""
    n = calib_size(calib)
    for i in range(0, n, chunk_size):
        if isinstance(calib, dict):
            yield {k: v[i : i + chunk_size] for k, v in calib.items()}
        else:
            yield calib[i : i + chunk_size]


def run_hooked(model, desc, calib: CalibBatch, chunk_size: int, handles: list) -> None:
    """One pass of the calibration batch, chunk by chunk, for the hooks in `handles` to observe; they are removed
    afterwards, also when the pass fails."""
    from s2d.arch.runner import model_inputs

    try:
        for chunk in iter_chunks(calib, chunk_size):
            model(**model_inputs(desc, chunk))
    finally:
        for h in handles:
            h.remove()
