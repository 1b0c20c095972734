"""s2d: diagnose activation outliers, condition with Selective Spectral Decay, compress with low rank."""

import os

# Offline is the default: nothing in s2d reaches a model hub unless the user unsets these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from s2d.errors import S2DError  # noqa: E402
from s2d.version import __version__  # noqa: E402


def load_model(spec, **kwargs):
    """Load a model and its tokenizer or processor by name, `tiny:<family>`, local folder, or a folder that
    `s2d compress` or `s2d quantize` wrote."""
    from s2d.commands.load import load_model as _load

    return _load(spec, **kwargs)


__all__ = ["S2DError", "load_model", "__version__"]
