"""QuantConfig: the small versioned dataclass every quantized model is made from and saved with."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from s2d.config import Config
from s2d.errors import S2DError
from s2d.quant.primitives import GRANULARITIES, OBSERVERS, QuantSpec, check_bits

# The field's names. "A16" means activations left in floating point, as papers write W4A16.
SCHEMES = ("W8A8", "W6A6", "W4A8", "W4A4", "W4A16", "W3A4")
METHODS = ("rtn", "gptq")
GPTQ_PRECISIONS = ("float32", "float64")
_SCHEME_RE = re.compile(r"^W(\d+)A(\d+)(?:KV(\d+))?$", re.IGNORECASE)


@dataclasses.dataclass
class QuantConfig(Config):
    """Weight and activation quantization, the weight method, and the outlier baselines applied first."""

    VERSION = 1

    w_bits: int | None = 8  # None: weights stay in floating point
    w_granularity: str = "per_channel"  # per_tensor | per_channel | per_group
    w_group_size: int | None = None
    w_symmetric: bool = True
    w_observer: str = "minmax"  # minmax | percentile | mse
    w_clip: float = 1.0  # weight ranges shrunk to w_clip·[lo, hi] (w_observer=mse searches its own instead)
    a_bits: int | None = 8  # None: activations stay in floating point
    a_granularity: str = "per_token"  # per_token | per_tensor | per_group (groups of a_group_size in each token)
    a_group_size: int | None = None
    a_symmetric: bool = True
    a_observer: str = "minmax"
    a_static: bool = False  # static scales are calibrated once (per_tensor); dynamic ones come from each input
    a_clip: float = 1.0  # activation ranges shrunk to a_clip·[lo, hi]: QuaRot's 0.9 for per-token scales
    a_clip_search: bool = False  # per Linear, the clip ratio (≤ a_clip) with the least output error on calibration
    ln_reparam: bool = False  # RepQ-ViT: even out the channel ranges of pre-norm outputs for static per-tensor scales
    clip_search_samples: int = 4  # calibration sequences the search runs on (each candidate costs a forward)
    grid: str = "restricted"  # symmetric grids: restricted (QuaRot, 2^b - 1 levels) or full (GPTQ, all 2^b)
    percentile: float = 99.9
    method: str = "rtn"  # rtn | gptq
    gptq_block_size: int = 128
    gptq_damp: float = 0.01  # added to the Hessian's diagonal, as a fraction of its mean
    gptq_act_order: bool = True
    gptq_precision: str = "float32"  # float32 (the reference's, fast) | float64 (a slower check)
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None = off
    rotate: bool = False  # QuaRot-style Hadamard rotation of the residual stream + online before down/fc2
    rotate_heads: bool = False  # with rotate: SpinQuant's R2, each head's values and o_proj input (folded)
    rotate_qk: bool = False  # QuaRot's R3: one head_dim Hadamard applied online to q and k after RoPE
    kv_bits: int | None = None  # K and V as the attention sees them (after RoPE), per head and token; None = FP
    kv_symmetric: bool = False  # QuaRot quantizes the KV cache asymmetrically
    kv_clip: float = 1.0  # QuaRot's paper clips the KV cache at 0.95
    softmax_bits: int | None = None  # RepQ-ViT: post-softmax attention probabilities on a log√2 grid; None = FP
    patch_embed_bits: int | None = None  # RepQ-ViT's W8A8 patch embedding (a vision model's Conv2d); None = FP
    residual_bits: int | None = None  # the residual stream at each block's output (FQ-ViT's regime); None = FP
    learn_rotation_steps: int = 0  # with rotate: SpinQuant's Cayley SGD steps on R1 (and R2); 0 = fixed Hadamard
    learn_rotation_lr: float = 1.5  # SpinQuant's learning rate on the Stiefel manifold
    learn_rotation_batch: int = 1  # calibration sequences per step
    layer_schemes: dict = dataclasses.field(default_factory=dict)  # pattern -> "WnAm": per-role/per-layer bits
    seed: int = 0

    def __post_init__(self):
        check_types(self)
        if self.w_group_size is not None and self.w_granularity != "per_group":
            raise S2DError(f"w_group_size={self.w_group_size} applies to per_group weights only, but w_granularity is "
                           f"{self.w_granularity!r}: add w_granularity=per_group, or drop w_group_size")
        for side, granularity, group in (("w", self.w_granularity, self.w_group_size),
                                         ("a", self.a_granularity, self.a_group_size)):
            if granularity == "per_group" and (not isinstance(group, int) or group < 1):
                raise S2DError(f"{side}_granularity=per_group needs a positive group size: set {side}_group_size "
                               f"(e.g. 32, 64 or 128), got {group!r}")
        self.weight_spec()
        self.act_spec()
        if self.w_granularity == "per_token":
            raise S2DError("per_token is an activation granularity; weights use per_tensor, per_channel or per_group")
        if self.a_granularity == "per_channel":
            raise S2DError("activations use per_token, per_group (within each token) or per_tensor, not per_channel")
        if self.a_group_size is not None and self.a_granularity != "per_group":
            raise S2DError(f"a_group_size={self.a_group_size} applies to per_group activations only: add "
                           "a_granularity=per_group, or drop a_group_size")
        if self.a_static and self.a_bits is not None and self.a_granularity != "per_tensor":
            raise S2DError("static activation scales are per_tensor (a per-token scale depends on the token); set "
                           "a_granularity='per_tensor' or a_static=False")
        if self.a_clip_search and (self.a_bits is None or self.a_static):
            raise S2DError("a_clip_search calibrates the clip of dynamic activation scales: it needs a_bits and "
                           "a_static=False (static scales take their range from calibration already)")
        if self.ln_reparam and not (self.a_static and self.a_granularity == "per_tensor"):
            raise S2DError("ln_reparam evens out the channel ranges a per-tensor static activation scale sees: use it "
                           "with a_static=True and a_granularity='per_tensor'")
        if self.ln_reparam and self.smooth_alpha is not None:
            raise S2DError("choose SmoothQuant or ln_reparam, not both: both rescale the channels of the norms that "
                           "feed Linears, and ln_reparam would undo the balance smooth_alpha sets there")
        if self.clip_search_samples < 1:
            raise S2DError(f"clip_search_samples must be ≥ 1, got {self.clip_search_samples}")
        if self.method not in METHODS:
            raise S2DError(f"unknown weight method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method == "gptq" and self.w_bits is None:
            raise S2DError("GPTQ quantizes weights: give w_bits (e.g. scheme W4A16), or use method='rtn'")
        if self.gptq_block_size < 1 or not 0 <= self.gptq_damp < 1:
            raise S2DError("gptq_block_size must be positive and gptq_damp in [0, 1)")
        if self.gptq_precision not in GPTQ_PRECISIONS:
            raise S2DError(f"unknown gptq_precision {self.gptq_precision!r}; use float32 (the default) or float64")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise S2DError(f"SmoothQuant alpha must be in [0, 1] (0.5 is the paper's default), got {self.smooth_alpha}")
        if self.rotate_heads and not self.rotate:
            raise S2DError("rotate_heads (R2) turns the heads inside a rotated model: use it with --rotate")
        if self.kv_bits is not None:
            check_bits(self.kv_bits, "KV-cache bits")
        if self.softmax_bits is not None:
            check_bits(self.softmax_bits, "softmax_bits (attention probabilities)")
        if self.patch_embed_bits is not None:
            check_bits(self.patch_embed_bits, "patch_embed_bits (the patch embedding's weights and input)")
        if self.residual_bits is not None:
            check_bits(self.residual_bits, "residual_bits (the residual stream between blocks)")
        if isinstance(self.kv_clip, bool) or not 0 < self.kv_clip <= 1:
            raise S2DError(f"kv_clip must be in (0, 1] (QuaRot clips the KV cache at 0.95), got {self.kv_clip!r}")
        if self.learn_rotation_steps < 0 or self.learn_rotation_batch < 1 or not self.learn_rotation_lr > 0:
            raise S2DError("learn_rotation_steps must be ≥ 0, learn_rotation_batch ≥ 1 and learn_rotation_lr > 0")
        if self.learn_rotation_steps and not self.rotate:
            raise S2DError("learned rotations (learn_rotation_steps) optimise the rotation of a rotated model: use "
                           "them with --rotate")
        for pattern, scheme in self.layer_schemes.items():
            if not isinstance(pattern, str) or not isinstance(scheme, str):
                raise S2DError(f"layer_schemes maps a role or a Linear-name pattern to a scheme such as W4A8, got "
                               f"{pattern!r}: {scheme!r}")
            if parse_kv_bits(scheme) is not None:
                raise S2DError(f"layer_schemes {pattern!r}: {scheme!r} sets KV-cache bits, which are one setting of "
                               "the whole model (kv_bits); give the Linears a scheme such as W4A8")
        if self.smooth_alpha is not None and self.rotate:
            raise S2DError("choose SmoothQuant or rotation, not both: the online rotation before down/fc2 leaves no "
                           "place to fold the smoothing scale of the down input")

    @classmethod
    def from_scheme(cls, scheme: str, **overrides: Any) -> QuantConfig:
        """A config for a scheme name such as "W4A4" (any WnAm with n, m in 2..16; 16 means floating point)."""
        w_bits, a_bits = parse_scheme(scheme)
        bits = {"w_bits": w_bits, "a_bits": a_bits}
        kv = parse_kv_bits(scheme)
        if kv is not None:
            bits["kv_bits"] = kv
        for key in bits:
            if key in overrides:
                raise S2DError(f"{key} comes from the scheme ({scheme} means "
                               f"{', '.join(f'{k}={v}' for k, v in bits.items())}); choose another scheme instead "
                               f"of overriding {key}")
        # from_dict: an unknown field is an S2DError listing the known ones, not a TypeError from __init__.
        return cls.from_dict({**overrides, **bits})

    @property
    def scheme(self) -> str:
        kv = "" if self.kv_bits is None else f"KV{self.kv_bits}"
        return f"W{self.w_bits or 16}A{self.a_bits or 16}{kv}"

    @property
    def label(self) -> str:
        """A short name for tables: scheme, method and baselines, e.g. "W4A4 rotate+gptq"."""
        steps = (["rotate"] if self.rotate else []) + ([f"smooth{self.smooth_alpha:g}"]
                                                         if self.smooth_alpha is not None else [])
        return f"{self.scheme} {'+'.join([*steps, self.method])}"

    @property
    def needs_calibration(self) -> bool:
        return (self.method == "gptq" or self.smooth_alpha is not None or self.a_clip_search
                or self.learn_rotation_steps > 0 or (self.a_static and self.a_bits is not None) or self.ln_reparam
                or self.softmax_bits is not None or (self.a_static and self.patch_embed_bits is not None)
                or (self.a_static and self.residual_bits is not None))

    def weight_spec(self) -> QuantSpec | None:
        return self.weight_spec_at(self.w_bits)

    def act_spec(self) -> QuantSpec | None:
        return self.act_spec_at(self.a_bits)

    def weight_spec_at(self, bits: int | None) -> QuantSpec | None:
        """The weights' spec with `bits` (None: floating point) and every other setting from this config: what a
        layer_schemes override gives its Linears."""
        if bits is None:
            return None
        check_bits(bits, "weight bits")
        return QuantSpec(bits, self.w_symmetric, self.w_granularity, self.w_group_size, self.w_observer,
                         self.percentile, self.w_clip, self.grid)

    def act_spec_at(self, bits: int | None) -> QuantSpec | None:
        if bits is None:
            return None
        check_bits(bits, "activation bits")
        return QuantSpec(bits, self.a_symmetric, self.a_granularity, self.a_group_size, self.a_observer,
                         self.percentile, self.a_clip, self.grid)


def check_types(config: Config) -> None:
    """Every field against its annotation: a wrong type fails here, naming the field, not deep in the math."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _is_a(value, hints[f.name]):
            raise S2DError(f"{type(config).__name__}.{f.name} must be {_type_name(hints[f.name])}, got {value!r}")


def _is_a(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is_a(value, a) for a in args)
    if hint is float:  # an int is a fine float (YAML reads 1 as an int); a bool is neither
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:  # a list is accepted where a tuple is declared: JSON and YAML have no tuples
        return isinstance(value, tuple | list) and all(_is_a(v, args[0]) for v in value)
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(args[0])}s"
    return {type(None): "None", bool: "true or false", int: "a whole number", float: "a number",
            str: "a string", dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def parse_scheme(scheme: str) -> tuple[int | None, int | None]:
    """("W4A8") -> (4, 8); 16 bits means floating point (None), as the field writes W4A16."""
    match = _SCHEME_RE.match(scheme.strip())
    if not match:
        raise S2DError(f"unknown scheme {scheme!r}: write W<bits>A<bits>[KV<bits>], e.g. {', '.join(SCHEMES)}")
    w, a = int(match.group(1)), int(match.group(2))
    check_bits(w, f"weight bits in {scheme}")
    check_bits(a, f"activation bits in {scheme}")
    return (None if w == 16 else w), (None if a == 16 else a)


def parse_kv_bits(scheme: str) -> int | None:
    """("W4A4KV4") -> 4; a scheme without a KV part (or KV16) leaves the KV cache in floating point."""
    parse_scheme(scheme)
    kv = _SCHEME_RE.match(scheme.strip()).group(3)
    if kv is None:
        return None
    check_bits(int(kv), f"KV-cache bits in {scheme}")
    return None if int(kv) == 16 else int(kv)


__all__ = ["GRANULARITIES", "METHODS", "OBSERVERS", "SCHEMES", "QuantConfig", "check_types", "parse_kv_bits",
           "parse_scheme"]
