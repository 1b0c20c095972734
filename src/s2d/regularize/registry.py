"""The regularizers by name: the one list the CLI's --reg choices, TrainConfig's validation and the loop read."""

from __future__ import annotations

from s2d.config import Config
from s2d.errors import S2DError
from s2d.regularize.baselines import KURE, SpectralNorm, WeightDecay
from s2d.regularize.config import KUREConfig, S2DConfig, SpectralNormConfig, WeightDecayConfig
from s2d.regularize.s2d import SelectiveSpectralDecay

REGULARIZERS = {"none": None, "s2d": (SelectiveSpectralDecay, S2DConfig), "wd": (WeightDecay, WeightDecayConfig),
                "specnorm": (SpectralNorm, SpectralNormConfig), "kure": (KURE, KUREConfig)}


def regularizer_config(name: str, options: dict) -> Config | None:
    """The validated config of regularizer `name` from its options (--reg-option KEY=VALUE); None for "none"."""
    if name not in REGULARIZERS:
        raise S2DError(f"reg must be one of {', '.join(REGULARIZERS)} (got {name!r})")
    if REGULARIZERS[name] is None:
        if options:
            raise S2DError(f"--reg none takes no options (got {sorted(options)}); choose a regularizer with --reg")
        return None
    config = REGULARIZERS[name][1].from_dict(options)
    return config.validate() if hasattr(config, "validate") else config


def make_regularizer(name: str, model, options: dict, optimizer):
    """The regularizer `name` over `model`, configured from `options` (S2D also sees the optimizer)."""
    config = regularizer_config(name, options)
    if config is None:
        return None
    cls = REGULARIZERS[name][0]
    return cls(model, config, optimizer=optimizer) if cls is SelectiveSpectralDecay else cls(model, config)
