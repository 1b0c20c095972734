"""Fake quantization: affine primitives, QuantLinear, RTN/GPTQ, SmoothQuant, Hadamard rotation, SQNR, save/load."""

from s2d.quant.api import (
    calibrate_activations,
    convert,
    convert_qat,
    prepare,
    prepare_qat,
    quantize,
    quantized_layers,
    strip_qat,
)
from s2d.quant.config import SCHEMES, QuantConfig, parse_scheme
from s2d.quant.io import restore, save_quantized
from s2d.quant.linear import FakeQuantLinear, QuantLinear
from s2d.quant.observer import RangeObserver
from s2d.quant.primitives import (
    QuantSpec,
    choose_qparams,
    dequantize_affine,
    fake_quantize,
    quantize_affine,
    ste,
)

__all__ = [
    "SCHEMES", "FakeQuantLinear", "QuantConfig", "QuantLinear", "QuantSpec", "RangeObserver", "calibrate_activations",
    "choose_qparams", "convert", "convert_qat", "dequantize_affine", "fake_quantize", "parse_scheme", "prepare",
    "prepare_qat", "quantize", "quantize_affine", "quantized_layers", "restore", "save_quantized", "ste", "strip_qat",
]
