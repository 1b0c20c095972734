"""Regularizers for fine-tuning: Selective Spectral Decay and its baselines, one interface for all."""

from s2d.regularize.base import Regularizer
from s2d.regularize.baselines import KURE, SpectralNorm, WeightDecay, kurtosis
from s2d.regularize.config import KUREConfig, S2DConfig, SpectralNormConfig, WeightDecayConfig
from s2d.regularize.registry import REGULARIZERS, make_regularizer, regularizer_config
from s2d.regularize.s2d import SelectiveSpectralDecay
from s2d.spectral import pcdr, top_singular

__all__ = [
    "KURE", "KUREConfig", "REGULARIZERS", "Regularizer", "S2DConfig", "SelectiveSpectralDecay", "SpectralNorm",
    "SpectralNormConfig", "WeightDecay", "WeightDecayConfig", "kurtosis", "make_regularizer", "pcdr",
    "regularizer_config", "top_singular",
]
