"""QuantLinear (integer weights + scales, fake-quantized inputs) and FakeQuantLinear (for QAT, with an STE)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from s2d.errors import S2DError
from s2d.quant.observer import RangeObserver
from s2d.quant.primitives import (
    QuantSpec,
    choose_qparams,
    dequantize_affine,
    fake_quantize,
    lsq_fake_quantize,
    quantize_affine,
)
from s2d.quant.rotate import Rotation


class StaticActCalibration:
    """A per-tensor static activation scale (the layer's act_scale and act_zero_point) and its calibration: shared
    by QuantLinear, the patch embedding's QuantConv2d and the QAT FakeQuantLinear, whose forwards observe while
    `observer` is set."""

    def register_static_scale(self, a_spec: QuantSpec) -> None:
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("act_zero_point", None if a_spec.symmetric else torch.zeros((), dtype=a_spec.int_dtype))

    def static_fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on the calibrated per-tensor grid, the one scale broadcast over every dimension."""
        ones = [1] * x.dim()
        zero = None if self.act_zero_point is None else self.act_zero_point.reshape(ones)
        return fake_quantize(x, self.a_spec, self.act_scale.reshape(ones), zero)

    def quantize_activation(self, x: torch.Tensor, dynamic_spec: QuantSpec) -> torch.Tensor:
        """Observe `x` while calibrating (and pass it on unrounded); else round it statically or dynamically."""
        if self.observer is not None:
            self.observer.update(x)
            return x
        return self.static_fake_quantize(x) if self.a_static else fake_quantize(x, dynamic_spec)

    def start_calibration(self) -> None:
        if self.a_static:
            self.observer = RangeObserver(self.a_spec)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Set the static scale (and zero point) from what the observer saw; nothing if it was not calibrating."""
        if self.observer is None:
            return
        observer, self.observer = self.observer, None
        scale, zero = observer.qparams()
        self.act_scale.copy_(scale.reshape(()))
        if zero is not None:
            self.act_zero_point.copy_(zero.reshape(()))


class QuantLinear(StaticActCalibration, nn.Module):
    """A Linear holding integer weights with their scales (and zero points), whose input is fake-quantized.

    Buffers: `qweight` (out x in, integer), `weight_scale` and `weight_zero_point` (one per block),
    `act_scale`/`act_zero_point` when activation scales are static, and an optional online `rotation` of the
    input. `weight` is the dequantized weight, kept (not saved) so a forward is one matmul.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, w_spec: QuantSpec | None,
                 a_spec: QuantSpec | None, a_static: bool = False, rotation: Rotation | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_spec, self.a_spec, self.a_static = w_spec, a_spec, bool(a_static and a_spec is not None)
        self.rotation = rotation
        self.observer: RangeObserver | None = None
        if w_spec is None:
            self.register_buffer("fp_weight", torch.zeros(out_features, in_features))
        else:
            self.block_size = w_spec.block_size((out_features, in_features))
            counts = (out_features // self.block_size[0], in_features // self.block_size[1])
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=w_spec.int_dtype))
            self.register_buffer("weight_scale", torch.ones(counts))
            self.register_buffer("weight_zero_point",
                                 None if w_spec.symmetric else torch.zeros(counts, dtype=w_spec.int_dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if self.a_static:
            self.register_static_scale(a_spec)
        elif a_spec is not None:  # dynamic scales: this layer's own clip ratio (a calibrated search may set it)
            self.register_buffer("act_clip", torch.tensor(float(a_spec.clip)))
        self.register_buffer("weight", torch.zeros(out_features, in_features), persistent=False)
        self.dynamic_spec = a_spec

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, w_spec: QuantSpec | None, a_spec: QuantSpec | None,
                    a_static: bool = False, qweight: torch.Tensor | None = None,
                    scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> QuantLinear:
        """Quantize `linear` by RTN, or wrap integer weights a method (GPTQ) already chose."""
        rotation = getattr(linear, "rotation", None)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w_spec, a_spec, a_static,
                  rotation)
        weight = linear.weight.detach().float()
        if w_spec is None:
            new.fp_weight.copy_(weight)
        else:
            if qweight is None:
                scale, zero_point = choose_qparams(weight, w_spec, new.block_size)
                qweight = quantize_affine(weight, scale, zero_point, w_spec, new.block_size)
            new.qweight.copy_(qweight)
            new.weight_scale.copy_(scale)
            if zero_point is not None:
                new.weight_zero_point.copy_(zero_point)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        new.refresh()
        return new.to(linear.weight.device)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the dequantized weight from the integer one (after loading buffers)."""
        if self.w_spec is None:
            self.weight = self.fp_weight.clone()
        else:
            self.weight = dequantize_affine(self.qweight, self.weight_scale, self.weight_zero_point, self.block_size)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()
        if getattr(self, "act_clip", None) is not None:
            self.set_clip(float(self.act_clip))

    @torch.no_grad()
    def set_clip(self, clip: float) -> None:
        """Clip this layer's dynamic activation ranges at `clip` (its spec is kept once, not rebuilt per call)."""
        import dataclasses

        self.act_clip.fill_(clip)  # the buffer's float32 value is the one used, so a reload reproduces it exactly
        self.dynamic_spec = dataclasses.replace(self.a_spec, clip=float(self.act_clip))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        if self.a_spec is not None:
            x = self.quantize_activation(x, self.dynamic_spec)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


    def plain_weight(self) -> torch.Tensor:
        """The dequantized weight with any online rotation folded back in: a plain Linear's equivalent weight."""
        if self.rotation is None:
            return self.weight.clone()
        return (self.weight.double() @ self.rotation.matrix().t()).float()

    def extra_repr(self) -> str:
        w = "fp" if self.w_spec is None else f"W{self.w_spec.bits} {self.w_spec.granularity}"
        a = "fp" if self.a_spec is None else f"A{self.a_spec.bits} {self.a_spec.granularity}"
        a += " static" if self.a_static else ""
        rot = ", rotated input" if self.rotation is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {w}, {a}{rot}"


class _GradScale(torch.autograd.Function):
    """The identity forward (bit for bit, so QAT's eval forward equals the integer model's), the gradient × g."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.g, None


class FakeQuantLinear(StaticActCalibration, nn.Linear):
    """For quantization-aware training: float weights, fake-quantized (weights and inputs) in the forward.

    Gradients pass through the rounding by the straight-through estimator. With `learn_scale`, each output
    channel's weight scale is a parameter trained with the weights (LSQ); otherwise it follows min-max.
    With `a_static`, the input has one per-tensor scale (`act_scale`), set by calibration (s2d.quant.qat) and
    then, with `learn_act_scale`, learned by LSQ (a parameter); without it kept fixed (a buffer).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, w_spec: QuantSpec | None,
                 a_spec: QuantSpec | None, learn_scale: bool = False, a_static: bool = False,
                 learn_act_scale: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.w_spec, self.a_spec = w_spec, a_spec
        self.a_static = bool(a_static and a_spec is not None)
        self.observer: RangeObserver | None = None
        if learn_scale:
            if w_spec is None or not w_spec.symmetric or w_spec.granularity != "per_channel":
                raise S2DError("learnable QAT scales need symmetric per-channel weights (e.g. scheme W4A4 defaults)")
            self.weight_scale = nn.Parameter(torch.ones(out_features))  # 1-D: no weight decay on it
        else:
            self.weight_scale = None
        if self.a_static:
            if a_spec.granularity != "per_tensor":
                raise S2DError("static activation scales are per_tensor: set a_granularity=per_tensor")
            if learn_act_scale and not a_spec.symmetric:
                raise S2DError("learned static activation scales (LSQ) are symmetric: set a_symmetric=true, or keep "
                               "the calibrated asymmetric scales fixed")
            if learn_act_scale:  # 0-d: AdamW's param_groups leave it undecayed
                self.act_scale = nn.Parameter(torch.ones(()))
            else:
                self.register_buffer("act_scale", torch.ones(()))
            self.register_buffer("act_zero_point",
                                 None if a_spec.symmetric else torch.zeros((), dtype=a_spec.int_dtype))
            # Saved with the checkpoints: a resumed run keeps its learned scale and is not calibrated again.
            self.register_buffer("act_calibrated", torch.zeros((), dtype=torch.bool))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, w_spec: QuantSpec | None, a_spec: QuantSpec | None,
                    learn_scale: bool = False, a_static: bool = False,
                    learn_act_scale: bool = True) -> FakeQuantLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w_spec, a_spec, learn_scale,
                  a_static, learn_act_scale)
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
        if learn_scale:
            new.weight_scale.copy_(choose_qparams(linear.weight.detach().float(), w_spec)[0].reshape(-1))
        return new.to(linear.weight.device, linear.weight.dtype)

    def quantized_weight(self) -> torch.Tensor:
        if self.w_spec is None:
            return self.weight
        if self.weight_scale is not None:
            return lsq_fake_quantize(self.weight, self.weight_scale.abs().clamp_min(1e-8).unsqueeze(1), self.w_spec)
        return fake_quantize(self.weight, self.w_spec)

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight, scale, zero_point) exactly as the forward rounds the weight, for QuantLinear."""
        w = self.weight.detach().float()
        if self.weight_scale is None:
            scale, zero = choose_qparams(w, self.w_spec)
        else:
            scale, zero = self.weight_scale.detach().abs().clamp_min(1e-8).float().reshape(-1, 1), None
        return quantize_affine(w, scale, zero, self.w_spec), scale, zero

    @property
    def learns_act_scale(self) -> bool:
        return self.a_static and isinstance(self.act_scale, nn.Parameter)

    def static_act_scale(self) -> torch.Tensor:
        """The scale the forward divides by: positive however the optimizer moved the parameter."""
        return self.act_scale.abs().clamp_min(1e-8)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:  # calibrating the static scale: observe, do not quantize yet
            self.observer.update(x)
            return x
        if not self.a_static:
            return fake_quantize(x, self.a_spec)
        if not bool(self.act_calibrated):
            raise S2DError("this QAT layer's static activation scale was never calibrated: run "
                           "s2d.quant.qat.calibrate_qat(model, batches) before training (s2d.train.train does)")
        if not self.learns_act_scale:  # QuantLinear's own static path, so the integer model matches bit for bit
            return self.static_fake_quantize(x)
        scale = self.static_act_scale()
        if torch.is_grad_enabled() and scale.requires_grad:
            # LSQ's gradient scale g = 1/sqrt(N·Qp), N the values this scale quantizes here: without it the scale's
            # gradient, a sum over every input value, would dwarf the weights' and dominate gradient clipping.
            scale = _GradScale.apply(scale, 1.0 / math.sqrt(x.numel() * self.a_spec.qmax))
        return lsq_fake_quantize(x, scale.to(x.dtype), self.a_spec)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self.observer is not None:
            super().finish_calibration()
            self.act_calibrated.fill_(True)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The QuantLinear whose forward is this layer's eval forward: the integers it rounds the weight to and,
        if static, the (learned) activation scale it uses."""
        q, scale, zero = self.integer_weight() if self.w_spec is not None else (None, None, None)
        new = QuantLinear.from_linear(self, self.w_spec, self.a_spec, self.a_static, q, scale, zero)
        if self.a_static:
            new.act_scale.copy_(self.static_act_scale().float())
            if self.act_zero_point is not None:
                new.act_zero_point.copy_(self.act_zero_point)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_spec is not None:
            x = self.quantize_input(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        a = "" if not self.a_static else f", static input scale ({'learned' if self.learns_act_scale else 'fixed'})"
        return super().extra_repr() + a
