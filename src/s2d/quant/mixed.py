"""Mixed precision: per-role and per-Linear schemes (`QuantConfig.layer_schemes`), average bits, and an automatic
allocation of a higher scheme to the Linears where it helps most under an average-bit budget.

A pattern is a role as the family adapter names it (q, k, v, o, gate, up, down; fc1, fc2 in encoders) or an
fnmatch glob on the Linear's module name ("model.layers.0.*", "*.mlp.down_proj"); later patterns win. A
matched Linear takes the scheme's bits; every other setting (granularity, symmetry, observer, clip, grid)
stays the config's. The pattern "head" names the model's head (the adapter's classifier or lm_head), which is
otherwise left in floating point: {"head": "W8A8"} quantizes it too (RepQ-ViT keeps its classifier at 8 bits).

Averages count floating point as 16 bits. Weight bits are weighted by each Linear's parameters; activation
bits by its multiply-accumulates per token (in × out, so the same weights): "A4.5" is the input bits averaged
over the Linear compute (an eighth of it on 8-bit inputs, the rest on 4-bit), which is what low-bit kernels
speed up, rather than over the count of input values. One cost unit for both sides also makes the allocation
a single knapsack over parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from s2d.arch import describe
from s2d.arch.families import ROLES
from s2d.arch.runner import model_inputs
from s2d.errors import S2DError
from s2d.quant.calib import CalibBatch, iter_chunks, require_calib
from s2d.quant.config import QuantConfig, parse_kv_bits, parse_scheme
from s2d.quant.linear import FakeQuantLinear, QuantLinear
from s2d.quant.observer import RangeObserver
from s2d.quant.primitives import QuantSpec
from s2d.quant.swap import leaf_filter, set_module, swap_linears

FP_BITS = 16
HEAD = "head"  # the layer_schemes pattern of the model's head (classifier, lm_head), which is left in FP otherwise
Specs = dict[str, tuple[QuantSpec | None, QuantSpec | None]]  # Linear name -> (weight spec, activation spec)
Filter = Callable[[nn.Module, str], bool]


def scheme_specs(config: QuantConfig, scheme: str) -> tuple[QuantSpec | None, QuantSpec | None]:
    w_bits, a_bits = parse_scheme(scheme)
    return config.weight_spec_at(w_bits), config.act_spec_at(a_bits)


def resolve(model: nn.Module, config: QuantConfig, target: Filter | None = None) -> Specs:
    """Each targeted nn.Linear's (weight spec, activation spec): the config's, or its last matching override.

    `target` is the filter the swap uses (default: every block Linear, the halves of a low-rank pair included).
    A pattern that matches no targeted Linear is an error: a typo must not silently quantize at the base bits.
    """
    desc = describe(model)
    target = target or leaf_filter(model, desc.is_target)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and target(m, n)]
    if HEAD in config.layer_schemes:  # the head is no block Linear: naming it in layer_schemes brings it in
        if desc.head is None or not isinstance(desc.module(desc.head), nn.Linear):
            raise S2DError(f"layer_schemes names the {HEAD!r}, but this {desc.family.name} model has no Linear head")
        linears = [n for n in linears if n != desc.head] + [desc.head]
    roles = {lin.name: lin.role for lin in desc.linears()}
    if desc.head is not None:
        roles[desc.head] = HEAD
    owners = {n: _owner(n, roles) for n in linears}  # the described Linear a low-rank half stands in for
    specs = {n: (config.weight_spec(), config.act_spec()) for n in linears}
    for pattern, scheme in config.layer_schemes.items():
        if pattern in ROLES or pattern == HEAD or pattern in roles.values():
            hits = [n for n in linears if roles.get(owners[n]) == pattern]
        else:
            hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(owners[n], pattern)]
        if not hits:
            present = sorted(set(roles.values()), key=lambda r: (ROLES + (r,)).index(r))
            example = linears[-1] if linears else "model.layers.0.mlp.down_proj"
            raise S2DError(f"layer_schemes pattern {pattern!r} matches none of the {len(linears)} quantized Linears; "
                           f"a pattern is a role of this model ({', '.join(present)}) or a glob on Linear names "
                           f"such as {example!r} or '*.{example.rpartition('.')[2]}'")
        for n in hits:
            specs[n] = scheme_specs(config, scheme)
    return specs


def _owner(name: str, roles: dict[str, str]) -> str:
    return name if name in roles else next((r for r in roles if name.startswith(r + ".")), name)


def uses_bits(config: QuantConfig, side: str) -> bool:
    """Whether any Linear may quantize this side ("w" or "a"): the base scheme or an override."""
    index = 0 if side == "w" else 1
    base = config.w_bits if side == "w" else config.a_bits
    return base is not None or any(parse_scheme(s)[index] is not None for s in config.layer_schemes.values())


def average_bits(model: nn.Module, specs: Specs | None = None) -> dict[str, float]:
    """{"w": ..., "a": ...} over the quantized Linears of `model`, or over the assignment `specs` (from
    `resolve`) before quantizing. See the module docstring for the weighting."""
    if specs is None:
        specs = {n: (m.w_spec, m.a_spec) for n, m in model.named_modules()
                 if isinstance(m, QuantLinear | FakeQuantLinear)}
    if not specs:
        raise S2DError("no quantized Linears to average: quantize the model first, or pass the resolved specs")
    sizes = {n: _size(model.get_submodule(n)) for n in specs}
    total = sum(sizes.values())

    def mean(index: int) -> float:
        return sum(_bits(specs[n][index]) * sizes[n] for n in specs) / total
    return {"w": mean(0), "a": mean(1)}


def _size(module: nn.Module) -> int:
    return module.in_features * module.out_features


def _bits(spec: QuantSpec | None) -> int:
    return FP_BITS if spec is None else spec.bits


# -- the automatic allocation ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Allocation:
    """The Linears raised to `high_scheme` (as explicit layer_schemes) and what the choice was made from."""

    high_scheme: str
    budget: float
    layer_schemes: dict[str, str]
    sensitivity: dict[str, float]  # per Linear: KL to FP of the all-base model minus KL with that Linear raised
    base_kl: float  # the all-base model's KL to FP, nats per output position
    average_bits: dict[str, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def raise_fraction(base: str, high: str, budget: float) -> float:
    """The share of Linear parameters that may be raised from `base` to `high` so that the average bits of every
    side the two schemes differ on stay within `budget`."""
    if parse_kv_bits(high) is not None:
        raise S2DError(f"the high scheme {high} sets KV-cache bits, a setting of the whole model: give the Linears' "
                       "scheme alone (e.g. W4A8) and kv_bits through the base scheme or --option kv_bits=N")
    pairs = [(b or FP_BITS, h or FP_BITS) for b, h in zip(parse_scheme(base), parse_scheme(high), strict=True)]
    changing = [(b, h) for b, h in pairs if b != h]
    if not changing or any(h < b for b, h in changing):
        raise S2DError(f"the high scheme {high} must raise bits over the base {base} on at least one side and "
                       "lower none (e.g. base W4A4 with --high-scheme W4A8 or W8A8)")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or budget < max(b for b, _ in changing):
        floor = max(b for b, _ in changing)
        raise S2DError(f"an average-bit budget of {budget!r} is below what the base scheme {base} already spends "
                       f"({floor} bits); give a budget from {floor} to {max(h for _, h in changing)}")
    return min(1.0, *((budget - b) / (h - b) for b, h in changing))


def choose(sensitivity: dict[str, float], sizes: dict[str, int], fraction: float) -> list[str]:
    """Greedy knapsack: Linears by sensitivity per raised parameter (= per extra bit, as every raised parameter
    costs the same extra bits), taken while they fit in `fraction` of all parameters.

    It stops at the first Linear that does not fit rather than skipping to smaller ones: the chosen sets are then
    nested (a larger budget raises a superset), at a cost of less than one Linear's share of the budget.
    """
    capacity = fraction * sum(sizes.values()) * (1 + 1e-9)  # a budget hit exactly still admits its Linear
    order = sorted(sensitivity, key=lambda n: sensitivity[n] / sizes[n], reverse=True)
    chosen, used = [], 0
    for name in order:
        if used + sizes[name] > capacity:
            break
        chosen.append(name)
        used += sizes[name]
    return chosen


def allocate(model: nn.Module, config: QuantConfig, high_scheme: str, budget: float, calib: CalibBatch | None,
             filter: Filter | None = None, *, measured: tuple[float, dict[str, float]] | None = None,
             chunk_size: int = 8, progress: bool = True) -> Allocation:
    """Which Linears of `model` (prepared: rotated or smoothed, not yet quantized) get `high_scheme` instead of
    the config's scheme within an average-bit `budget`. The result's layer_schemes go into the config.

    `measured` reuses an earlier `measure_sensitivity` of the same model, config and high scheme (a budget sweep
    then costs one measurement)."""
    if config.layer_schemes:
        raise S2DError("the allocation starts from one base scheme: drop layer_schemes (by hand) to allocate "
                       "automatically, or set them all by hand")
    fraction = raise_fraction(config.scheme, high_scheme, budget)
    target = leaf_filter(model, filter or describe(model).is_target)
    if measured is None:
        require_calib(calib, "the mixed-precision allocation (to measure each Linear's sensitivity)")
        measured = measure_sensitivity(model, config, high_scheme, calib, target, chunk_size, progress)
    base_kl, sensitivity = measured
    sizes = {n: _size(model.get_submodule(n)) for n in sensitivity}
    raised = set(choose(sensitivity, sizes, fraction))
    layer_schemes = {n: high_scheme for n in sensitivity if n in raised}  # in model order, readable
    mixed = dataclasses.replace(config, layer_schemes=layer_schemes)
    return Allocation(high_scheme, float(budget), layer_schemes, sensitivity, base_kl,
                      average_bits(model, resolve(model, mixed, target)))


@torch.no_grad()
def measure_sensitivity(model: nn.Module, config: QuantConfig, high_scheme: str, calib: CalibBatch,
                        target: Filter | None = None, chunk_size: int = 8,
                        progress: bool = True) -> tuple[float, dict[str, float]]:
    """(the all-base model's KL to FP, {Linear: gain}): per targeted Linear, how much raising it alone to
    `high_scheme` lowers the KL divergence of the output logits to the FP model while every other Linear is at
    the config's scheme. KL in nats per output position; one forward of `calib` per Linear.

    The gain is measured at the operating point the allocation starts from (everything at the base scheme), so
    it includes how a layer's error compounds with the quantization upstream, which a one-layer-quantized
    measurement misses. The KL of the final logits works for every family (no labels needed). Weights are
    rounded by RTN here (GPTQ would need a calibration pass per choice); the clip search is not run (the ceiling
    a_clip is used). Static activation scales come from one calibration pass, as `convert` takes them; when the
    high scheme also raises weight bits, the Linears after a raised one keep the all-base scales where `convert`
    would recalibrate them on its slightly different outputs (a second-order difference; none for W4A4 → W4A8).
    """
    from tqdm.auto import tqdm

    desc = describe(model)
    target = target or leaf_filter(model, desc.is_target)
    chunks = list(iter_chunks(calib, chunk_size))
    reference = [F.log_softmax(_logits(desc, model, chunk), -1) for chunk in chunks]
    work = copy.deepcopy(model)
    base, high = (config.weight_spec(), config.act_spec()), scheme_specs(config, high_scheme)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and target(m, n)]
    swap_linears(work, target, lambda linear, name: QuantLinear.from_linear(linear, *base, config.a_static))
    high_scales = _calibrate(desc, work, names, high[1] if config.a_static else None, chunks)

    def kl() -> float:
        total, positions = 0.0, 0
        for chunk, ref in zip(chunks, reference, strict=True):
            out = F.log_softmax(_logits(desc, work, chunk), -1)
            total += float(F.kl_div(out, ref, log_target=True, reduction="sum"))
            positions += ref.shape[0]
        return total / positions

    base_kl, gains = kl(), {}
    for name in tqdm(names, desc="sensitivity", disable=not progress):
        at_base = work.get_submodule(name)
        raised = QuantLinear.from_linear(model.get_submodule(name), *high, config.a_static)
        if raised.a_static:
            raised.observer = high_scales[name]
            raised.finish_calibration()
        set_module(work, name, raised)
        gains[name] = base_kl - kl()
        set_module(work, name, at_base)
    return base_kl, gains


def _calibrate(desc, work: nn.Module, names: list[str], high: QuantSpec | None, chunks: list) -> dict:
    """Static activation scales of the all-base model from one pass over `chunks`, as `convert` calibrates them
    (every layer observing at once), and an observer per Linear of its inputs for its `high` spec: a Linear's
    input in that pass does not depend on its own scheme, so the pass serves every raised variant too."""
    static = [m for m in work.modules() if isinstance(m, QuantLinear) and m.a_static]
    observers = {n: RangeObserver(high) for n in names} if high is not None else {}
    if not static and not observers:
        return observers

    def observe(observer):
        def hook(module, args):
            observer.update(args[0] if module.rotation is None else module.rotation(args[0]))
        return hook

    handles = [work.get_submodule(n).register_forward_pre_hook(observe(o)) for n, o in observers.items()]
    for m in static:
        m.start_calibration()
    try:
        for chunk in chunks:
            _logits(desc, work, chunk)
    finally:
        for h in handles:
            h.remove()
    for m in static:
        m.finish_calibration()
    return observers


def _logits(desc, model: nn.Module, chunk: CalibBatch) -> torch.Tensor:
    """The model's output logits, one row per scored position (padding dropped where a mask says so)."""
    logits = model(**model_inputs(desc, chunk)).logits.float()
    mask = chunk.get("attention_mask") if isinstance(chunk, dict) else None
    if mask is not None and logits.dim() == 3:
        return logits[mask.bool()]
    return logits.reshape(-1, logits.shape[-1])
