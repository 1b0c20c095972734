"""Classification accuracy for sequence-classification (encoder + head) and image-classification (ViT) models."""

from __future__ import annotations

import torch
from torch import nn

from s2d.errors import S2DError


@torch.inference_mode()
def predict(model: nn.Module, inputs: dict, batch_size: int = 64) -> torch.Tensor:
    """Predicted class per example: argmax of the logits, in minibatches along the first dimension."""
    if not inputs:
        raise S2DError("no model inputs given: pass input_ids (and attention_mask) or pixel_values")
    sizes = {k: v.shape[0] for k, v in inputs.items() if torch.is_tensor(v)}
    if not sizes or len(set(sizes.values())) != 1:
        raise S2DError(f"model inputs must be tensors with one shared batch dimension, got sizes {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise S2DError("no examples to classify: the batch is empty")
    device = next(model.parameters()).device
    preds = []
    for i in range(0, n, batch_size):
        chunk = {k: (v[i : i + batch_size].to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        logits = model(**chunk).logits
        if logits.dim() != 2:
            raise S2DError(f"{type(model).__name__} returns logits of shape {tuple(logits.shape)}, not "
                           "(batch, classes): classification accuracy needs a sequence- or image-classification "
                           "head (e.g. BertForSequenceClassification, ViTForImageClassification)")
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(preds)


def classification_accuracy(model: nn.Module, batch: dict, batch_size: int = 64) -> float:
    """Fraction of examples whose argmax logit equals `batch["labels"]`; the other keys are the model inputs."""
    if "labels" not in batch:
        raise S2DError("the batch has no 'labels': give the true class of every example")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = torch.as_tensor(batch["labels"]).reshape(-1)
    preds = predict(model, inputs, batch_size)
    if preds.shape[0] != labels.shape[0]:
        raise S2DError(f"{labels.shape[0]} labels for {preds.shape[0]} examples")
    return float((preds == labels).double().mean())
