"""RepQ-ViT's reparameterization of the norms that feed Linears, for per-tensor static activation scales.

One per-tensor scale is set by the widest channel, and the channels after a LayerNorm differ widely (its gain
and bias set them), so most channels get only a few levels. RepQ-ViT (Li et al., 2023) gives each such channel
its own scale and zero point on calibration data, then moves their variation into the weights so that inference
stays layer-wise with one scale. Here, in the same spirit: channel c of a norm's output y spans [lo_c, hi_c] on
the calibration batch; with r_c = span_c / mean(span) and mid_c its centre, the norm is made to output

    y'_c = (y_c - mid_c) / r_c        (every channel now spans the same [-S/2, S/2], S = mean(span))

by dividing its gain and bias by r_c and shifting its bias by -mid_c / r_c, and every Linear reading y takes
W·diag(r) and the bias b + W·mid, since W·y = W·diag(r)·y' + W·mid. RepQ-ViT writes the same map with
integer per-channel zero points aligned to their mean; centring on 0 suits a symmetric grid as well.
An RMSNorm has no bias to shift: its channels are scaled to the same max|y| instead (r_c = amax_c / mean(amax)).

This preserves the function only where the norm's output goes to Linears alone: the pre-norms (attn_in,
mlp_in) of pre-norm families (ViT, Llama, Qwen2, Gemma3), also after a rotation, which leaves RMSNorms with a
unit gain to reparameterize in the rotated basis. A post-norm (BERT, MPNet) also carries the residual stream
into the next LayerNorm, whose mean and variance mix the channels, so a per-channel change of its output cannot
be undone there: those families are refused. Final norms feed the head, which is not quantized: left alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from s2d.arch import describe
from s2d.arch.families import NORM_FEEDS
from s2d.arch.fold import fold_into_linear
from s2d.errors import S2DError
from s2d.quant.calib import CalibBatch, require_calib, run_hooked

Filter = Callable[[nn.Module, str], bool]
MIN_RATIO = 1e-4  # a channel far narrower than the rest keeps r_c ≥ this (its values need not fill [-S/2, S/2])


def check_reparameterizable(model: nn.Module) -> None:
    desc = describe(model)
    if not desc.family.pre_norm:
        raise S2DError(f"ln_reparam cannot preserve the function of a {desc.family.name} model: its LayerNorms are "
                       "post-norms whose output also carries the residual stream into the next LayerNorm, which "
                       "mixes channels, so a per-channel rescaling cannot be undone there. Use ln_reparam on "
                       "pre-norm families (vit, llama, qwen2, gemma3), or drop it")


def reparam_groups(model: nn.Module, filter: Filter | None = None) -> dict[str, list[nn.Module]]:
    """{norm name: the Linears it feeds} for every pre-norm that feeds a targeted Linear."""
    check_reparameterizable(model)
    desc = describe(model)
    target = filter or desc.is_target
    groups = {}
    for block in desc.blocks:
        for norm_name, tag in block.norms.items():
            readers = [lin for lin in block.linears if lin.role in NORM_FEEDS.get(tag, ())]
            if readers and any(target(lin.module, lin.name) for lin in readers):
                if getattr(desc.module(norm_name), "weight", None) is None:
                    raise S2DError(f"ln_reparam needs a gain to rescale, but {norm_name} has none")
                groups[norm_name] = [lin.module for lin in readers]
    return groups


@torch.no_grad()
def channel_ranges(model: nn.Module, calib: CalibBatch, names: list[str], chunk_size: int = 8):
    """{name: (lo, hi)}: each output channel's min and max of the named modules over the calibration batch."""
    desc = describe(model)
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(module, args, out):
            y = out.detach().reshape(-1, out.shape[-1]).double()
            lo, hi = y.amin(0), y.amax(0)
            if name in ranges:
                lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
            ranges[name] = (lo, hi)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    run_hooked(model, desc, calib, chunk_size, handles)
    return ranges


@torch.no_grad()
def reparameterize(norm: nn.Module, readers: list[nn.Module], lo: torch.Tensor, hi: torch.Tensor,
                   gain_offset: float = 0.0) -> torch.Tensor:
    """Rescale (and, with a bias, centre) `norm`'s output channels of range [lo, hi] and compensate in `readers`;
    returns r. The norm scales by (gain_offset + weight), as Gemma's RMSNorm does with 1 + weight."""
    bias = getattr(norm, "bias", None)
    if bias is None:
        width, mid = torch.maximum(lo.abs(), hi.abs()), torch.zeros_like(lo)
    else:
        width, mid = hi - lo, (hi + lo) / 2
    alive = width > 0
    if not alive.any():
        return torch.ones_like(lo)
    r = torch.where(alive, width / width[alive].mean(), torch.ones_like(width)).clamp(min=MIN_RATIO)
    gain = norm.weight.double() + gain_offset
    norm.weight.copy_((gain / r - gain_offset).to(norm.weight.dtype))
    if bias is not None:
        bias.copy_(((bias.double() - mid) / r).to(bias.dtype))
    for linear in readers:  # it read y = r ⊙ y' + mid
        fold_into_linear(linear, r, mid if bias is not None else None)
    return r


@torch.no_grad()
def reparameterize_norms(model: nn.Module, calib: CalibBatch | None, filter: Filter | None = None,
                         chunk_size: int = 8) -> dict[str, torch.Tensor]:
    """Apply the reparameterization to every pre-norm feeding a targeted Linear, in place; {norm: r}."""
    require_calib(calib, "ln_reparam (to measure each norm channel's range)")
    groups = reparam_groups(model, filter)
    if not groups:
        raise S2DError("ln_reparam found no norm that feeds a quantized Linear; check the filter, or drop ln_reparam")
    ranges = channel_ranges(model, calib, list(groups), chunk_size)
    offset = describe(model).family.norm_gain_offset
    return {name: reparameterize(model.get_submodule(name), readers, *ranges[name], offset)
            for name, readers in groups.items()}
