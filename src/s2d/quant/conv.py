"""The vision patch embedding (a Conv2d) at its own bits: RepQ-ViT keeps it at W8A8 while the blocks go lower.

Weights are rounded by RTN per output channel (each filter, flattened, has one scale); the input (the pixels) is
fake-quantized per tensor, with a static calibrated scale when the config's activations are static, else a
dynamic one per input. Which Conv2d is the patch embedding comes from the adapter (`describe(model).patch_embed`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from s2d.arch import describe
from s2d.errors import S2DError
from s2d.quant.config import QuantConfig
from s2d.quant.linear import StaticActCalibration
from s2d.quant.observer import RangeObserver
from s2d.quant.primitives import QuantSpec, choose_qparams, dequantize_affine, quantize_affine
from s2d.quant.swap import set_module


def patch_embed_specs(config: QuantConfig) -> tuple[QuantSpec, QuantSpec]:
    """(weight spec, input spec) at patch_embed_bits, every other setting the config's."""
    bits = config.patch_embed_bits
    w = QuantSpec(bits, config.w_symmetric, "per_channel", None, config.w_observer, config.percentile, config.w_clip,
                  config.grid)
    a = QuantSpec(bits, config.a_symmetric, "per_tensor", None, config.a_observer, config.percentile, config.a_clip,
                  config.grid)
    return w, a


class QuantConv2d(StaticActCalibration, nn.Module):
    """A Conv2d holding integer weights (one scale per output channel) whose input is fake-quantized per tensor.

    Buffers as QuantLinear's: `qweight` (out x in·kh·kw), `weight_scale`, `weight_zero_point`, `bias`, and
    `act_scale`/`act_zero_point` when static; `weight` (out, in, kh, kw) is the dequantized one, not saved."""

    def __init__(self, conv: nn.Conv2d, w_spec: QuantSpec, a_spec: QuantSpec, a_static: bool):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise S2DError(f"the patch embedding pads by {conv.padding_mode!r}/{conv.padding!r}; patch_embed_bits "
                           "handles zero padding by size only: drop patch_embed_bits for this model")
        self.shape = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.w_spec, self.a_spec, self.a_static = w_spec, a_spec, a_static
        self.observer: RangeObserver | None = None
        out, flat = self.shape[0], conv.weight[0].numel()
        self.register_buffer("qweight", torch.zeros(out, flat, dtype=w_spec.int_dtype))
        self.register_buffer("weight_scale", torch.ones(out, 1))
        self.register_buffer("weight_zero_point", None if w_spec.symmetric else
                             torch.zeros(out, 1, dtype=w_spec.int_dtype))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        if a_static:
            self.register_static_scale(a_spec)
        self.register_buffer("weight", torch.zeros(self.shape), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, w_spec: QuantSpec, a_spec: QuantSpec, a_static: bool) -> QuantConv2d:
        new = cls(conv, w_spec, a_spec, a_static)
        weight = conv.weight.detach().float().reshape(new.shape[0], -1)
        scale, zero = choose_qparams(weight, w_spec)
        new.qweight.copy_(quantize_affine(weight, scale, zero, w_spec))
        new.weight_scale.copy_(scale.reshape(-1, 1))
        if zero is not None:
            new.weight_zero_point.copy_(zero.reshape(-1, 1))
        new.refresh()
        return new.to(conv.weight.device)

    @torch.no_grad()
    def refresh(self) -> None:
        block = (1, self.qweight.shape[1])
        self.weight = dequantize_affine(self.qweight, self.weight_scale, self.weight_zero_point, block).reshape(
            self.shape)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_activation(x, self.a_spec)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, W{self.w_spec.bits} per_channel, A{self.a_spec.bits} per_tensor" + \
            (" static" if self.a_static else "")


def patch_embed_name(model: nn.Module) -> str:
    """The qualified name of the model's patch-embedding Conv2d; S2DError for a model without one."""
    desc = describe(model)
    if desc.patch_embed is None:
        raise S2DError(f"patch_embed_bits quantizes a vision model's patch embedding, but only vision models have a "
                       f"patch embedding and {desc.family.name} ({desc.kind}) is not one: drop patch_embed_bits")
    return desc.patch_embed


def quantize_patch_embed(model: nn.Module, config: QuantConfig, name: str | None = None) -> QuantConv2d:
    """Swap the patch embedding's Conv2d (at `name`, found by the adapter if not given) for a QuantConv2d at
    config.patch_embed_bits (RTN weights), in place."""
    name = name or patch_embed_name(model)
    conv = model.get_submodule(name)
    if not isinstance(conv, nn.Conv2d):
        raise S2DError(f"{name} is a {type(conv).__name__}, not the Conv2d patch_embed_bits quantizes")
    layer = QuantConv2d.from_conv(conv, *patch_embed_specs(config), config.a_static)
    set_module(model, name, layer)
    return layer


@torch.no_grad()
def restore_patch_embed(model: nn.Module, config: QuantConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put the saved QuantConv2d back in a model loaded from a saved folder (its integer weights and scales)."""
    if config.patch_embed_bits is None:
        return
    name = patch_embed_name(model)
    layer, prefix = quantize_patch_embed(model, config, name), name + "."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise S2DError(f"{where} does not match the patch embedding {prefix[:-1]}: missing {missing}, "
                       f"unexpected {unexpected}; save the model again")
