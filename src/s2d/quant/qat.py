"""Static activation scales for quantization-aware training: calibrated once, on the first training batches.

A static QAT layer (FakeQuantLinear with a_static) starts uncalibrated. `calibrate_qat` runs the batches through
the model with every such layer observing its input (with the QuantConfig's observer, as `quantize` calibrates a
static QuantLinear: weights already rounded, inputs observed in floating point) and sets each scale from what it
saw; training then learns the scale (LSQ) or keeps it. `convert_qat` turns the layers into QuantLinears holding
those scales, so the saved integer model's forward is the QAT model's eval forward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from s2d.errors import S2DError
from s2d.quant.config import QuantConfig
from s2d.quant.linear import FakeQuantLinear

# The QuantConfig fields a FakeQuantLinear simulates. The rest (GPTQ, rotation, SmoothQuant, ln_reparam, clip
# search, KV cache) are PTQ steps QAT does not run: accepting them would train one model and name another.
QAT_OPTIONS = ("w_granularity", "w_group_size", "w_symmetric", "w_observer", "w_clip", "a_granularity",
               "a_group_size", "a_symmetric", "a_observer", "a_static", "a_clip", "grid", "percentile",
               "layer_schemes")


def qat_quant_config(scheme: str, options: dict | None = None) -> QuantConfig:
    """The QuantConfig QAT simulates: `scheme` with `options` (QAT_OPTIONS only); bad combinations are S2DErrors."""
    options = dict(options or {})
    other = sorted(set(options) - set(QAT_OPTIONS))
    if other:
        raise S2DError(f"QAT option(s) {', '.join(other)} are not simulated by quantization-aware training; QAT takes "
                       f"{', '.join(QAT_OPTIONS)} (apply PTQ steps such as rotation or GPTQ with `s2d quantize`)")
    return QuantConfig.from_scheme(scheme, **options)


def static_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear) and m.a_static}


def needs_qat_calibration(model: nn.Module) -> bool:
    """True if some static QAT layer has no calibrated scale yet."""
    return any(not bool(m.act_calibrated) for m in static_layers(model).values())


@torch.no_grad()
def calibrate_qat(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Set every static QAT layer's scale from `batches` (dicts of model inputs) in one pass, in eval mode (no
    dropout, no RNG drawn); returns the scales by layer name. The model's train/eval mode is kept."""
    layers = static_layers(model)
    if not layers:
        return {}
    was_training = model.training
    model.eval()
    for m in layers.values():
        m.start_calibration()
    seen = 0
    try:
        for batch in batches:
            model(**batch)
            seen += 1
        if not seen:
            raise S2DError("static QAT scales need calibration data, but no batch was given")
        for m in layers.values():
            m.finish_calibration()
    finally:
        for m in layers.values():
            m.observer = None
        model.train(was_training)
    return {n: float(m.static_act_scale()) for n, m in layers.items()}
