"""Fold pre-norm gains (and LayerNorm biases) into the Linears they feed, preserving the function.

After folding, the norm only normalizes and the Linears carry its per-channel scale, so a spectral method
(S2D) or a rotation (QuaRot) sees the channel structure the norm introduced.
"""

from __future__ import annotations

import torch
from torch import nn

from s2d.arch.describe import ModelDescription
from s2d.arch.families import NORM_FEEDS
from s2d.errors import S2DError


@torch.no_grad()
def fold_norm_gains(desc: ModelDescription) -> list[str]:
    """Fold every pre-norm's gain into the Linears it feeds; returns the folded norms' names."""
    if not desc.family.pre_norm:
        raise S2DError(f"{desc.family.name} uses post-norms, whose gains scale the residual stream rather than a "
                       "Linear's input, so they cannot be folded; run without norm folding for this model")
    offset = desc.family.norm_gain_offset
    folded = []
    for block in desc.blocks:
        for norm_name, tag in block.norms.items():
            roles = NORM_FEEDS.get(tag)
            if roles is None:
                continue
            linears = [lin.module for lin in block.linears if lin.role in roles]
            norm = desc.module(norm_name)
            if not linears or getattr(norm, "weight", None) is None:
                continue
            gain = norm.weight.double() + offset
            shift = getattr(norm, "bias", None)
            for linear in linears:
                _fold_into(linear, gain, shift)
            norm.weight.fill_(1.0 - offset)
            if shift is not None:
                shift.zero_()
            folded.append(norm_name)
    return folded


def _fold_into(linear: nn.Linear, gain: torch.Tensor, shift: torch.Tensor | None) -> None:
    # W·(g⊙x̂ + β) + b  ==  (W·diag(g))·x̂ + (W·β + b)
    weight = linear.weight.double()
    if shift is not None:
        extra = weight @ shift.double()
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
        linear.bias.add_(extra.to(linear.bias.dtype))
    linear.weight.copy_((weight * gain).to(linear.weight.dtype))
