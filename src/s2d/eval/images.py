"""Image-classification tasks for vision models (`s2d eval` and `s2d quantize --eval`): top-1 accuracy on a test
split, and the calibration images `s2d quantize` takes from the matching train split."""

from __future__ import annotations

import torch
from torch import nn

from s2d.errors import S2DError

IMAGE_TASKS = {"image:fashion-mnist": "fashion-mnist", "image:digits": "digits"}  # task -> s2d.assets image set
VERSION = 1


def image_set(task: str) -> str:
    if task not in IMAGE_TASKS:
        raise S2DError(f"unknown image task {task!r}; use one of {', '.join(IMAGE_TASKS)}")
    return IMAGE_TASKS[task]


def _pixels(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    from s2d.assets import pixel_values

    config = model.config
    if getattr(config, "image_size", None) is None:
        raise S2DError(f"{type(model).__name__} has no image_size in its config: image tasks need a vision model")
    return pixel_values(images, int(config.image_size), int(getattr(config, "num_channels", 1)))


def calibration_images(model: nn.Module, images: str, n_samples: int, folder=None, seed: int = 0) -> dict:
    """`n_samples` seeded train images of the set `images` as the model's pixel_values (never test images)."""
    from s2d.assets import image_split

    (train, _), _ = image_split(images, folder, seed)
    if n_samples < 1:
        raise S2DError(f"n_samples must be ≥ 1, got {n_samples}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_samples]
    return {"pixel_values": _pixels(model, train[order])}


def evaluate_image_task(model: nn.Module, task: str, limit: int | None = None, folder=None, seed: int = 0,
                        batch_size: int = 64) -> dict:
    """Top-1 accuracy on the first `limit` images of the task's test split (all of them without a limit)."""
    from s2d.assets import image_split
    from s2d.eval.classify import classification_accuracy

    name = image_set(task)
    _, (images, labels) = image_split(name, folder, seed)
    images, labels = images[:limit], labels[:limit]
    logits_width = getattr(model.config, "num_labels", None)
    classes = int(labels.max()) + 1
    if logits_width is not None and logits_width < classes:
        raise S2DError(f"the model has {logits_width} output classes and {name} has {classes}: fine-tune it on "
                       f"{name} first (s2d finetune MODEL --task image --image-data {name})")
    acc = classification_accuracy(model, {"pixel_values": _pixels(model, images), "labels": labels}, batch_size)
    return {"kind": "image", "version": VERSION, "acc": acc, "n": len(labels), "chance": 1 / classes,
            "source": f"{name} test split, first {len(labels):,} images"}
