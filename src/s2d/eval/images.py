"""Image-classification tasks for vision models (`s2d eval` and `s2d quantize --eval`): top-1 accuracy on a test
split. The calibration images come from the matching train split (s2d.assets.calibration_images)."""

from __future__ import annotations

from torch import nn

from s2d.errors import S2DError

IMAGE_TASKS = {"image:fashion-mnist": "fashion-mnist", "image:digits": "digits"}  # task -> s2d.assets image set
VERSION = 1


def image_set(task: str) -> str:
    if task not in IMAGE_TASKS:
        raise S2DError(f"unknown image task {task!r}; use one of {', '.join(IMAGE_TASKS)}")
    return IMAGE_TASKS[task]


def evaluate_image_task(model: nn.Module, task: str, limit: int | None = None, folder=None, seed: int = 0,
                        batch_size: int = 64) -> dict:
    """Top-1 accuracy on the first `limit` images of the task's test split (all of them without a limit)."""
    from s2d.assets import image_split, model_pixels
    from s2d.eval.classify import classification_accuracy

    name = image_set(task)
    images, labels = image_split(name, "test", folder, seed)
    images, labels = images[:limit], labels[:limit]
    logits_width = getattr(model.config, "num_labels", None)
    classes = int(labels.max()) + 1
    if logits_width is not None and logits_width < classes:
        raise S2DError(f"the model has {logits_width} output classes and {name} has {classes}: fine-tune it on "
                       f"{name} first (s2d finetune MODEL --task image --image-data {name})")
    acc = classification_accuracy(model, {"pixel_values": model_pixels(model, images), "labels": labels}, batch_size)
    return {"kind": "image", "version": VERSION, "acc": acc, "n": len(labels), "chance": 1 / classes,
            "source": f"{name} test split, first {len(labels):,} images"}
