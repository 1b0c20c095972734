"""The one verb: `quantize(model, QuantConfig, filter=..., calib=...)`, torchao style.

It is `prepare` (the function-preserving outlier baselines: rotation, SmoothQuant) followed by `convert`
(weights by RTN or GPTQ, inputs fake-quantized, static activation scales calibrated). The two halves are
public so a caller can keep the prepared full-precision model as a reference (per-layer SQNR does).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from s2d.arch import describe
from s2d.arch.runner import model_inputs
from s2d.errors import S2DError
from s2d.quant.calib import CalibBatch, iter_chunks, require_calib
from s2d.quant.config import QuantConfig
from s2d.quant.conv import QuantConv2d, patch_embed_name, quantize_patch_embed
from s2d.quant.gptq import gptq_model
from s2d.quant.kvcache import (
    check_attention_quantizable,
    check_softmax_quantizable,
    kv_spec,
    quantize_kv,
    quantize_softmax,
    rotate_qk,
)
from s2d.quant.linear import FakeQuantLinear, QuantLinear
from s2d.quant.mixed import resolve, uses_bits
from s2d.quant.primitives import fake_quantize
from s2d.quant.reparam import check_reparameterizable, reparameterize_norms
from s2d.quant.residual import ResidualQuant, quantize_residual
from s2d.quant.rotate import check_rotatable, rotate_model
from s2d.quant.smooth import smooth_model
from s2d.quant.softmax import LogSqrt2Quant
from s2d.quant.swap import composite_targets, leaf_filter, swap_linears

Filter = Callable[[nn.Module, str], bool]


def quantize(model: nn.Module, config: QuantConfig, filter: Filter | None = None, calib: CalibBatch | None = None,
             *, chunk_size: int = 8, progress: bool = True) -> nn.Module:
    """Quantize `model` in place and return it: baselines, then the targeted Linears (default: all block Linears)."""
    _check_inputs(model, config, calib, filter)
    prepare(model, config, filter, calib, chunk_size=chunk_size, progress=progress)
    return convert(model, config, filter, calib, chunk_size=chunk_size, progress=progress)


@torch.no_grad()
def prepare(model: nn.Module, config: QuantConfig, filter: Filter | None = None, calib: CalibBatch | None = None,
            *, chunk_size: int = 8, progress: bool = True) -> nn.Module:
    """Apply the config's function-preserving baselines (rotation, R3 on q/k, learned rotation, SmoothQuant,
    RepQ-ViT's norm reparameterization) in place."""
    _check_inputs(model, config, calib, filter)
    if config.rotate:
        rotate_model(model, seed=config.seed, heads=config.rotate_heads)
    if config.rotate_qk:  # R3: online, after RoPE, so it needs no weights turned
        rotate_qk(model, seed=config.seed)
    if config.learn_rotation_steps:
        from s2d.quant.spinquant import learn_rotations

        model.s2d_rotation_history = learn_rotations(model, config, calib, progress)
    if config.smooth_alpha is not None:
        smooth_model(model, calib, config.smooth_alpha, filter, chunk_size)
    if config.ln_reparam:  # last: it measures the norm outputs the quantized Linears will read (rotated or not)
        reparameterize_norms(model, calib, filter, chunk_size)
    return model


@torch.no_grad()
def convert(model: nn.Module, config: QuantConfig, filter: Filter | None = None, calib: CalibBatch | None = None,
            *, chunk_size: int = 8, progress: bool = True) -> nn.Module:
    """Swap the targeted Linears for QuantLinears (RTN or GPTQ weights), quantize the KV cache (kv_bits), the
    attention probabilities (softmax_bits), the patch embedding (patch_embed_bits) and the residual stream between
    blocks (residual_bits), and calibrate static activation scales and softmax deltas."""
    _check_inputs(model, config, calib, filter)
    desc = describe(model)
    target = leaf_filter(model, filter or desc.is_target)
    specs, static = resolve(model, config, target), config.a_static  # each Linear's own (layer_schemes)
    chosen = lambda module, name: name in specs  # noqa: E731  the targets, and the head if layer_schemes names it

    def rtn(linear, name):
        return QuantLinear.from_linear(linear, *specs[name], static)

    if config.method == "gptq":
        def make(linear, q, scale, zero, name):
            return QuantLinear.from_linear(linear, specs[name][0], specs[name][1], static, q, scale, zero)

        gptq_model(model, calib, {n: w for n, (w, _) in specs.items()}, make, target, config.gptq_block_size,
                   config.gptq_damp, config.gptq_act_order, chunk_size, progress, config.gptq_precision)
    swap_linears(model, chosen, rtn)  # after GPTQ: what it left (the head, outside the blocks) is rounded by RTN
    if config.kv_bits is not None:  # before calibration, so static scales and clip searches see the KV rounding
        quantize_kv(model, kv_spec(config))
    if config.softmax_bits is not None:
        quantize_softmax(model, config.softmax_bits)
    if config.patch_embed_bits is not None:
        quantize_patch_embed(model, config)
    if config.residual_bits is not None:
        quantize_residual(model, config)
    if calib is not None:  # a no-op unless some layer has a static scale or a softmax delta to calibrate
        calibrate_activations(model, calib, chunk_size)
    if config.a_clip_search:
        search_activation_clips(model, next(iter_chunks(calib, config.clip_search_samples)), config.a_clip,
                                chunk_size, progress)
    model.s2d_quant_config = config
    return model


CLIP_STEPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)  # times the ceiling a_clip


@torch.no_grad()
def search_activation_clips(model: nn.Module, calib: CalibBatch, ceiling: float = 1.0, chunk_size: int = 8,
                            progress: bool = True) -> dict[str, float]:
    """Give each QuantLinear with dynamic activation scales the clip ratio whose output error is least.

    The error of a candidate is ‖x̂_c Ŵᵀ − x Ŵᵀ‖² summed over the calibration tokens, with x the layer's real
    input (after the quantized layers upstream) and Ŵ its quantized weight, so it measures the activation
    rounding alone. One forward of the batch scores every candidate of every layer at once.
    """
    import dataclasses

    from tqdm.auto import tqdm

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.a_spec is not None
              and not m.a_static}
    candidates = [ceiling * c for c in CLIP_STEPS]
    errors = {n: torch.zeros(len(candidates), dtype=torch.float64) for n in layers}

    def score(name: str, layer: QuantLinear):
        specs = [dataclasses.replace(layer.a_spec, clip=c) for c in candidates]

        def hook(module, args):
            x = args[0] if layer.rotation is None else layer.rotation(args[0])
            reference = F.linear(x, layer.weight.to(x.dtype))
            for i, spec in enumerate(specs):
                diff = F.linear(fake_quantize(x, spec), layer.weight.to(x.dtype)) - reference
                errors[name][i] += diff.double().pow(2).sum()
        return hook

    handles = [m.register_forward_pre_hook(score(n, m)) for n, m in layers.items()]
    desc = describe(model)
    try:
        for chunk in tqdm(list(iter_chunks(calib, chunk_size)), desc="clip search", disable=not progress):
            model(**model_inputs(desc, chunk))
    finally:
        for h in handles:
            h.remove()
    chosen = {n: candidates[int(errors[n].argmin())] for n in layers}
    for n, m in layers.items():
        m.set_clip(chosen[n])
    return chosen


@torch.no_grad()
def calibrate_activations(model: nn.Module, calib: CalibBatch, chunk_size: int = 8) -> None:
    """Set every static activation scale (QuantLinear, QuantConv2d, ResidualQuant) and every softmax delta from the
    calibration batch, all in one pass (each observes the model with weights quantized and activations in float)."""
    layers = [m for m in model.modules() if (isinstance(m, QuantLinear | QuantConv2d | ResidualQuant) and m.a_static)
              or isinstance(m, LogSqrt2Quant)]
    if not layers:
        return
    for m in layers:
        m.start_calibration()
    desc = describe(model)
    try:
        for chunk in iter_chunks(calib, chunk_size):
            model(**model_inputs(desc, chunk))
    finally:
        for m in layers:
            m.finish_calibration()


def prepare_qat(model: nn.Module, config: QuantConfig, filter: Filter | None = None,
                learn_scales: bool = False, learn_act_scales: bool = True) -> nn.Module:
    """Swap the targeted Linears for FakeQuantLinears (float weights, STE gradients) for quantization-aware training.

    With `learn_scales`, each weight scale is a parameter (LSQ); add it to the optimizer with the weights. With
    config.a_static, each input gets a per-tensor scale to calibrate (s2d.quant.qat.calibrate_qat), then learned
    by LSQ (`learn_act_scales`) or kept fixed.
    """
    if (config.softmax_bits, config.patch_embed_bits, config.residual_bits) != (None, None, None):
        raise S2DError("QAT trains the Linears only: softmax_bits, patch_embed_bits and residual_bits are PTQ "
                       "settings; drop them from the QAT config")
    target = filter or describe(model).is_target
    _check_group_size(model, config, target)
    specs = resolve(model, config, target)
    swap_linears(model, lambda m, name: name in specs, lambda linear, name: FakeQuantLinear.from_linear(
        linear, *specs[name], learn_scales, config.a_static, learn_act_scales))
    model.s2d_quant_config = config
    return model


@torch.no_grad()
def convert_qat(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Turn a QAT model into QuantLinears holding the very integers its forward rounded to and, for static
    activations, the scales it learned (in place): the result's forward is the QAT model's eval forward."""
    def make(linear: nn.Module, name: str) -> nn.Module:
        return linear.to_quant_linear() if isinstance(linear, FakeQuantLinear) else linear

    swap_linears(model, lambda m, name: isinstance(m, FakeQuantLinear), make)
    model.s2d_quant_config = config
    return model


@torch.no_grad()
def strip_qat(model: nn.Module) -> nn.Module:
    """Put plain nn.Linears (the float weights) back in place of FakeQuantLinears, in place."""
    def make(linear: nn.Module, name: str) -> nn.Module:
        plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        plain.load_state_dict({k: v for k, v in linear.state_dict().items() if k in ("weight", "bias")})
        return plain.to(linear.weight.device, linear.weight.dtype)

    swap_linears(model, lambda m, name: isinstance(m, FakeQuantLinear), make)
    if hasattr(model, "s2d_quant_config"):
        del model.s2d_quant_config
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_quantizable(model: nn.Module, config: QuantConfig, filter: Filter | None = None) -> None:
    """What `config` asks of the model, checked before any work (a run can call it right after loading): a
    rotatable family, no low-rank pair under SmoothQuant, weight groups that fit every targeted Linear."""
    target = filter or describe(model).is_target
    if config.rotate:
        check_rotatable(model)
    check_attention_quantizable(model, config)  # kv_bits and rotate_qk need a decoder's attention
    if config.softmax_bits is not None:
        check_softmax_quantizable(model)  # no soft-capping or sinks the eager attention would drop
    if config.patch_embed_bits is not None:
        patch_embed_name(model)  # only vision models have one
    if config.ln_reparam:
        check_reparameterizable(model)  # post-norm families cannot take it
    if config.smooth_alpha is not None:  # rotation turns a low-rank pair's two sides; SmoothQuant cannot yet
        low_rank = composite_targets(model, target)
        if low_rank:
            raise S2DError(f"SmoothQuant rescales dense weights, but {low_rank[0]} (and {len(low_rank) - 1} more) "
                           "is a low-rank pair: quantize a low-rank model with rotation, RTN or GPTQ, or apply "
                           "SmoothQuant before compressing")
    _check_group_size(model, config, leaf_filter(model, target))


def _check_inputs(model: nn.Module, config: QuantConfig, calib: CalibBatch | None, filter: Filter | None) -> None:
    """Fail before any work: missing calibration data, or a model the config does not fit."""
    if config.method == "gptq":
        require_calib(calib, "GPTQ (to build each layer's Hessian)")
    if config.ln_reparam:
        require_calib(calib, "ln_reparam (to measure each norm channel's range)")
    if config.a_static and uses_bits(config, "a"):
        require_calib(calib, "static activation scales")
    if config.smooth_alpha is not None:
        require_calib(calib, "SmoothQuant (to measure activation ranges)")
    if config.learn_rotation_steps:
        require_calib(calib, "learned rotations (the quantized loss they minimise)")
    if config.softmax_bits is not None:
        require_calib(calib, "softmax_bits (to calibrate each attention layer's delta)")
    if config.a_static and config.patch_embed_bits is not None:
        require_calib(calib, "the patch embedding's static input scale")
    if config.a_static and config.residual_bits is not None:
        require_calib(calib, "the residual stream's static scales (residual_bits)")
    check_quantizable(model, config, filter)


def _check_group_size(model: nn.Module, config: QuantConfig, target: Filter) -> None:
    """Every quantized Linear's input size must split into whole groups (of weights, and of each token's
    activations): name the first that does not."""
    specs = resolve(model, config, target)  # a Linear left in FP on a side (layer_schemes) needs no groups there
    for side, index, group in (("w", 0, config.w_group_size), ("a", 1, config.a_group_size)):
        sizes = {name: model.get_submodule(name).in_features for name, pair in specs.items()
                 if pair[index] is not None and pair[index].granularity == "per_group"}
        if not sizes:
            continue
        misfit = next((name for name, size in sizes.items() if size % group), None)
        if misfit is not None:
            common = math.gcd(*sizes.values())
            fits = max(d for d in range(1, min(group, common) + 1) if common % d == 0)
            raise S2DError(f"{side}_group_size={group} does not divide the input size {sizes[misfit]} of {misfit}: a "
                           f"group must divide every quantized Linear's input size; use {side}_group_size={fits} (it "
                           f"divides all {len(sizes)} of them) or {side}_granularity=per_"
                           f"{'channel' if side == 'w' else 'token'}")
