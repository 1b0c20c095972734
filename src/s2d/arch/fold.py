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
                fold_into_linear(linear, gain, shift)
            norm.weight.fill_(1.0 - offset)
            if shift is not None:
                shift.zero_()
            folded.append(norm_name)
    return folded


def input_side(module: nn.Module) -> nn.Linear:
    """The Linear that reads `module`'s input: itself, or A of a low-rank pair (W = B·A), which names it
    `input_linear` (s2d.lowrank.FactorizedLinear). Weight rewrites that turn one side of a layer (norm folding,
    rotation) use this and `output_side`, so they work on a pair without knowing its class."""
    return getattr(module, "input_linear", module)


def output_side(module: nn.Module) -> nn.Linear:
    """The Linear that writes `module`'s output: itself, or B of a low-rank pair (`output_linear`)."""
    return getattr(module, "output_linear", module)


def fold_into_linear(linear: nn.Module, gain: torch.Tensor, shift: torch.Tensor | None) -> None:
    """Make `linear` read g⊙x + β where it read x (g, β per input channel), in place."""
    # W·(g⊙x̂ + β) + b  ==  (W·diag(g))·x̂ + (W·β + b). A low-rank pair takes the gain on A's columns and
    # W·β = B·(A·β) on B's bias.
    reader, writer = input_side(linear), output_side(linear)
    weight = reader.weight.double()
    if shift is not None:
        extra = weight @ shift.double()
        if writer is not reader:
            extra = writer.weight.double() @ extra
        if writer.bias is None:
            writer.bias = nn.Parameter(torch.zeros(writer.out_features, dtype=writer.weight.dtype))
        writer.bias.add_(extra.to(writer.bias.dtype))
    reader.weight.copy_((weight * gain).to(reader.weight.dtype))
