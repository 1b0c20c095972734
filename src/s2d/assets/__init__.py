"""Where models and data come from: packaged assets, local folders and tiny test models."""

from s2d.assets.data import (
    DATASETS,
    IMAGE_SETS,
    calibration_batch,
    calibration_images,
    image_split,
    load_analogies,
    load_digits,
    load_fashion_mnist,
    load_polarity,
    load_wiki,
    model_pixels,
    pixel_values,
    wiki_text,
    wiki_tokens,
)
from s2d.assets.models import MODELS, load_model

__all__ = [
    "DATASETS",
    "IMAGE_SETS",
    "MODELS",
    "calibration_batch",
    "calibration_images",
    "image_split",
    "load_analogies",
    "load_digits",
    "load_fashion_mnist",
    "load_model",
    "load_polarity",
    "load_wiki",
    "model_pixels",
    "pixel_values",
    "wiki_text",
    "wiki_tokens",
]
