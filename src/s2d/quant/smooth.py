"""SmoothQuant: migrate activation outliers into the weights with a per-channel scale s (Xiao et al. 2023).

For a group of Linears reading the same input X, s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha); X is divided by
s and every weight's column j multiplied by it, so the product is unchanged. The division is folded into what
produces X: a pre-norm's gain (for q/k/v and gate/up or fc1) or the up projection's output rows (for down,
whose input is act(gate) * up). Which norm feeds which Linears comes from `s2d.arch.families`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from s2d.arch import describe
from s2d.arch.families import LINEAR_FEEDS, NORM_FEEDS
from s2d.errors import S2DError
from s2d.quant.calib import require_calib, run_hooked


def smooth_groups(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """(kind, source name, consumer Linear names): kind is "norm" or "linear"; what SmoothQuant can fold."""
    desc = describe(model)
    groups = []
    for block in desc.blocks:
        if desc.family.pre_norm:
            for norm_name, tag in block.norms.items():
                consumers = [lin.name for lin in block.linears if lin.role in NORM_FEEDS.get(tag, ())]
                if consumers and getattr(desc.module(norm_name), "weight", None) is not None:
                    groups.append(("norm", norm_name, consumers))
        for lin in block.linears:
            consumers = [c.name for c in block.linears if c.role in LINEAR_FEEDS.get(lin.role, ())]
            if consumers:
                groups.append(("linear", lin.name, consumers))
    if not groups:
        raise S2DError(f"SmoothQuant has nowhere to fold its scales in a {desc.family.name} model: it needs pre-norms "
                       "or gated MLPs, and this family's norms sit inside the residual stream. Run without --smooth")
    return groups


@torch.no_grad()
def input_absmax(model: nn.Module, calib: torch.Tensor | dict, names: list[str], chunk_size: int = 8):
    """Per-input-channel max |x| of each named Linear over the calibration batch (a streaming max)."""
    desc = describe(model)
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    run_hooked(model, desc, calib, chunk_size, handles)
    return stats


@torch.no_grad()
def smooth_model(model: nn.Module, calib: torch.Tensor | dict | None, alpha: float = 0.5,
                 filter: Callable[[nn.Module, str], bool] | None = None,
                 chunk_size: int = 8) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant in place (function-preserving); returns the scale of each smoothed group."""
    require_calib(calib, "SmoothQuant (to measure activation ranges)")
    if not 0 <= alpha <= 1:
        raise S2DError(f"SmoothQuant alpha must be in [0, 1] (0.5 is the paper's default), got {alpha}")
    desc = describe(model)
    target = filter or desc.is_target
    groups = [g for g in smooth_groups(model) if any(target(model.get_submodule(c), c) for c in g[2])]
    absmax = input_absmax(model, calib, sorted({c for g in groups for c in g[2]}), chunk_size)
    offset = desc.family.norm_gain_offset
    scales = {}
    for kind, source, consumers in groups:
        act = torch.stack([absmax[c] for c in consumers]).amax(0).double()
        weights = [model.get_submodule(c).weight for c in consumers]
        wmax = torch.cat([w.detach().abs() for w in weights]).amax(0).double()
        s = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
        s = torch.where((act > 0) & (wmax > 0), s, torch.ones_like(s))  # dead channels keep scale 1
        src = model.get_submodule(source)
        if kind == "norm":  # the norm scales by (offset + w): divide that gain, and any bias, by s
            src.weight.copy_(((src.weight.double() + offset) / s - offset).to(src.weight.dtype))
        else:  # the producing Linear's output row j feeds input channel j
            src.weight.copy_((src.weight.double() / s[:, None]).to(src.weight.dtype))
        if getattr(src, "bias", None) is not None:
            src.bias.copy_((src.bias.double() / s).to(src.bias.dtype))
        for w in weights:
            w.copy_((w.double() * s).to(w.dtype))
        scales[source] = s.float()
    return scales

