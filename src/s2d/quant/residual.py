"""The residual stream quantized at every block boundary (residual_bits): the fully quantized regime.

RepQ-ViT's setting quantizes the inputs of the Linears and matmuls only, so the residual stream, where massive
activations live, stays in floating point and a LayerNorm caps what reaches the next Linear. Integer pipelines that
also keep the residual sums in low bits (FQ-ViT, Lin et al. 2022, which quantizes the LayerNorm inputs; the W8A8
setting of Bondarenko et al. 2023, which quantizes the residual sums and norm inputs) meet the outliers directly:
with a per-tensor static scale, the largest entry of the stream sets the step of every token and channel.

Here each block's output (the stream as the next block and the final norm read it, on both the skip path and the
norm) is fake-quantized at residual_bits, with the config's activation granularity and observer: per tensor with a
static scale under a_static, else dynamic (per token: the control where the max costs only its own token). The
residual inside a block (after attention, before the MLP) is left in floating point: it is not a module boundary
every family exposes. Each block gets a `s2d_residual` child (its scale is in the state dict) and a forward hook
that is a module-level function, so a deep copy of the model keeps working hooks on its own quantizers.
"""

from __future__ import annotations

import torch
from torch import nn

from s2d.arch import describe
from s2d.errors import S2DError
from s2d.quant.config import QuantConfig
from s2d.quant.linear import StaticActCalibration
from s2d.quant.observer import RangeObserver
from s2d.quant.primitives import QuantSpec

ATTR = "s2d_residual"


def residual_spec(config: QuantConfig) -> QuantSpec:
    """The stream's spec: residual_bits, every other setting the activations'."""
    if config.residual_bits is None:
        raise S2DError("residual_spec needs residual_bits")
    return config.act_spec_at(config.residual_bits)


class ResidualQuant(StaticActCalibration, nn.Module):
    """The quantizer of one block's output: a static per-tensor scale (calibrated) or dynamic scales."""

    def __init__(self, spec: QuantSpec, static: bool):
        super().__init__()
        self.a_spec, self.a_static = spec, static
        self.observer: RangeObserver | None = None
        if static:
            self.register_static_scale(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_activation(x, self.a_spec)

    def extra_repr(self) -> str:
        return f"A{self.a_spec.bits} {self.a_spec.granularity}" + (" static" if self.a_static else "")


def _quantize_output(block: nn.Module, args, output):
    quant = getattr(block, ATTR)
    if isinstance(output, tuple):
        return (quant(output[0]), *output[1:])
    return quant(output)


def quantize_residual(model: nn.Module, config: QuantConfig) -> list[str]:
    """Attach a ResidualQuant (scale 1 until calibrated) to every block's output; returns the blocks' names."""
    names = []
    for block in describe(model).blocks:
        if isinstance(getattr(block.module, ATTR, None), ResidualQuant):
            raise S2DError(f"{block.name} already quantizes its output (residual_bits); quantize the original model")
        device = next(block.module.parameters(), next(block.module.buffers(), torch.empty(0))).device
        setattr(block.module, ATTR, ResidualQuant(residual_spec(config), config.a_static).to(device))
        block.module.register_forward_hook(_quantize_output)
        names.append(block.name)
    return names


def owned_names(model: nn.Module) -> list[str]:
    """Qualified names of the ResidualQuant submodules (their scales go to quantization.safetensors)."""
    return [n for n, m in model.named_modules() if isinstance(m, ResidualQuant)]


@torch.no_grad()
def restore_residual(model: nn.Module, config: QuantConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Re-attach the block-output quantizers of a saved model, with their saved scales."""
    if config.residual_bits is None:
        return
    quantize_residual(model, config)
    for name in owned_names(model):
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = model.get_submodule(name).load_state_dict(state, strict=False)
        if missing or unexpected:
            raise S2DError(f"{where} does not match the residual quantizer {name}: missing {missing}, unexpected "
                           f"{unexpected}; save the model again")
