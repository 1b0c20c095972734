"""KV-cache quantization and QuaRot's R3: what each attention layer does to q, k and v after RoPE.

A decoder's attention (Llama, Qwen2, Gemma3) projects q, k, v, applies its q/k norms and RoPE, and hands the
three, shaped (batch, heads, seq, head_dim), to the function transformers' AttentionInterface registers under
`config._attn_implementation`. That call is the one place that sees K and V exactly as attention uses them,
so we register a wrapper of the model's own implementation ("s2d_kv+sdpa" around sdpa, "s2d_kv+eager" around
the module's eager code, each with the same mask builder) and switch the model to it. The wrapper passes
q, k, v through the layer's `s2d_kv` submodule (an `AttentionQuant`, so its buffers are in the state dict):

- R3 turns q and k by one orthogonal head_dim rotation R (a randomized Hadamard). (q R)(k R)ᵀ = q kᵀ, so it is
  function-preserving in floating point; it spreads K's outlier channels before K is rounded.
- K and V are fake-quantized per head and per token: one scale (and zero point) over each head's head_dim
  vector of each token, asymmetric by default, with the clip ratio.

transformers appends the floating-point k, v to its cache before calling attention, so the whole cache is
quantized again at every decoding step; with per-token scales that is the same as quantizing each token once
when it is stored, since a token's codes depend on its own vector only.

Saving: R3's rotations are saved in quantization.safetensors. The plain-transformers model.safetensors cannot
express R3 or KV quantization (both run online, inside the attention), so only s2d's `restore`
(`s2d.load_model`) reproduces them; plain `from_pretrained` gives the model without them.

softmax_bits (RepQ-ViT's log√2 quantizer, s2d.quant.softmax) hooks in at the same place, in every family: the
AttentionQuant also holds the layer's LogSqrt2Quant (its calibrated delta is saved with the rest), and a module
that has one is computed by s2d.quant.softmax.eager_attention instead of its own implementation. The model is then
switched to "s2d_kv+eager", whose mask is the eager one: sdpa's may be None for a causal model that relies on
sdpa's is_causal, which a hand-written attention cannot. Encoders (BERT, ViT) hook in the same way; MPNet, which
computes its own softmax without AttentionInterface, gets a pre-hook on the dropout it applies to its probabilities.
"""

from __future__ import annotations

import itertools
import sys
from functools import partial

import torch
from torch import nn

from s2d.arch import FAMILIES, describe
from s2d.errors import S2DError
from s2d.quant.config import QuantConfig
from s2d.quant.primitives import QuantSpec, fake_quantize
from s2d.quant.rotate import Rotation, random_rotation
from s2d.quant.softmax import LogSqrt2Quant, check_reproducible, eager_attention

ATTR = "s2d_kv"  # the submodule each attention module gets
PREFIX = "s2d_kv+"  # the registered implementation "s2d_kv+sdpa" wraps "sdpa"
R3_SEED = 104729  # offset from the config's seed, so R3 differs from R1, R2 and the online rotations


class AttentionQuant(nn.Module):
    """q, k, v -> (q R, k R, v) with R3, then K and V fake-quantized; either part may be absent. `softmax`, when
    set, quantizes the attention probabilities (softmax_bits)."""

    def __init__(self, rotation: Rotation | None = None, spec: QuantSpec | None = None,
                 softmax: LogSqrt2Quant | None = None):
        super().__init__()
        self.rotation = rotation
        self.spec = spec
        self.softmax = softmax

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.rotation is not None:  # the same R on every query and KV head: exact under GQA too
            q, k = self.rotation(q), self.rotation(k)
        if self.spec is not None:  # per_token on (b, h, t, head_dim): one scale per (b, h, t)
            k, v = fake_quantize(k, self.spec), fake_quantize(v, self.spec)
        return q, k, v

    def extra_repr(self) -> str:
        return "" if self.spec is None else f"kv_bits={self.spec.bits}, symmetric={self.spec.symmetric}, " \
                                            f"clip={self.spec.clip}"


def kv_spec(config: QuantConfig) -> QuantSpec | None:
    if config.kv_bits is None:
        return None
    return QuantSpec(config.kv_bits, config.kv_symmetric, "per_token", clip=config.kv_clip, grid=config.grid)


def check_attention_quantizable(model: nn.Module, config: QuantConfig) -> None:
    """kv_bits and rotate_qk need a decoder's attention: an encoder has neither a KV cache nor RoPE."""
    if config.kv_bits is None and not config.rotate_qk:
        return
    family = describe(model).family
    if not family.attention:
        asked = " and ".join(k for k, on in (("kv_bits", config.kv_bits is not None),
                                             ("rotate_qk", config.rotate_qk)) if on)
        raise S2DError(f"{family.name} ({family.kind}) has no KV cache or RoPE for {asked} to act on (they "
                       "round and rotate a decoder's keys after RoPE): drop the KV part of the scheme (W4A4, not "
                       f"W4A4KV4) and rotate_qk, which apply to {', '.join(f.name for f in FAMILIES if f.attention)}")


def rotate_qk(model: nn.Module, seed: int = 0) -> None:
    """R3 on every attention layer (one head_dim rotation per layer); function-preserving."""
    size = describe(model).head_dim
    for i, attn in enumerate(_attention_modules(model).values()):
        _hook(attn).rotation = random_rotation(size, seed + R3_SEED + i).to(_device(attn))
    _use_wrapper(model)


def quantize_kv(model: nn.Module, spec: QuantSpec) -> None:
    """Fake-quantize K and V of every attention layer by `spec` (per_token)."""
    for attn in _attention_modules(model).values():
        _hook(attn).spec = spec
    _use_wrapper(model)


def owned_names(model: nn.Module) -> list[str]:
    """Qualified names of the AttentionQuant submodules (their tensors go to quantization.safetensors)."""
    return [n for n, m in model.named_modules() if isinstance(m, AttentionQuant)]


def check_softmax_quantizable(model: nn.Module) -> None:
    """softmax_bits needs every attention module to be one s2d's eager attention reproduces."""
    for module in _probs_modules(model).values():
        check_reproducible(module)


def quantize_softmax(model: nn.Module, bits: int) -> None:
    """Give every attention layer a log√2 quantizer of its probabilities (delta 1 until calibrated)."""
    family = describe(model).family
    for attn in _probs_modules(model).values():
        _hook(attn).softmax = LogSqrt2Quant(bits).to(_device(attn))
        if family.probs_dropout:
            _hook_dropout(attn, family.probs_dropout)
    if not family.probs_dropout:
        _use_wrapper(model, eager=True)


def restore_attention(model: nn.Module, config: QuantConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Re-attach R3 (its saved rotation buffers), the KV spec and the softmax quantizers (their saved deltas) to
    a model loaded from a saved folder."""
    if config.kv_bits is not None or config.rotate_qk:
        _restore_kv(model, config, tensors, where)
    if config.softmax_bits is None:
        return
    quantize_softmax(model, config.softmax_bits)
    for name, attn in _probs_modules(model).items():
        key = f"{name}.{ATTR}.softmax.delta"
        if key not in tensors:
            raise S2DError(f"{where} has no softmax delta for {name} (softmax_bits is on); save the model again")
        getattr(attn, ATTR).softmax.delta.copy_(tensors[key])


def _restore_kv(model: nn.Module, config: QuantConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    spec = kv_spec(config)
    for name, attn in _attention_modules(model).items():
        rotation = None
        if config.rotate_qk:
            prefix = f"{name}.{ATTR}.rotation."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            factors = sorted(k for k in state if k.startswith("factor"))
            if "signs" not in state or not factors:
                raise S2DError(f"{where} has no R3 rotation for {name} (rotate_qk is on); save the model again")
            rotation = Rotation.skeleton(state["signs"].numel(), [state[k].shape[0] for k in factors])
            rotation.load_state_dict(state)
        setattr(attn, ATTR, AttentionQuant(rotation, spec).to(_device(attn)))
    _use_wrapper(model)


# -- the attention wrapper ----------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    desc = describe(model)
    if not desc.family.attention:
        raise S2DError(f"{desc.family.name} has no decoder attention to quantize the KV cache of")
    return {b.attention: desc.module(b.attention) for b in desc.blocks}


def _probs_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the modules that compute each block's attention probabilities (the adapter's `probs`)."""
    desc = describe(model)
    if not all(b.probs for b in desc.blocks):
        raise S2DError(f"s2d does not know where {desc.family.name} computes its attention probabilities; drop "
                       "softmax_bits for this model")
    return {b.probs: desc.module(b.probs) for b in desc.blocks}


def _hook_dropout(attn: nn.Module, path: str) -> None:
    """Quantize the probabilities `attn` passes to its dropout submodule at `path` (once per module)."""
    dropout = attn.get_submodule(path)
    if not getattr(dropout, "_s2d_probs_hooked", False):
        dropout.register_forward_pre_hook(partial(_quantize_probs, attn))
        dropout._s2d_probs_hooked = True


def _quantize_probs(attn: nn.Module, dropout: nn.Module, args: tuple):
    quant = getattr(getattr(attn, ATTR, None), "softmax", None)
    return args if quant is None else (quant(args[0]), *args[1:])


def _hook(attn: nn.Module) -> AttentionQuant:
    if not isinstance(getattr(attn, ATTR, None), AttentionQuant):
        setattr(attn, ATTR, AttentionQuant())
    return getattr(attn, ATTR)


def _device(module: nn.Module) -> torch.device:
    # a quantized attention's Linears are QuantLinears, which hold buffers only
    return next(itertools.chain(module.parameters(), module.buffers())).device


def _attend(base: str, module: nn.Module, query, key, value, attention_mask, **kwargs):
    hook = getattr(module, ATTR, None)
    if hook is not None:
        query, key, value = hook(query, key, value)
        if hook.softmax is not None:
            return eager_attention(hook.softmax, module, query, key, value, attention_mask, **kwargs)
    return _implementation(base, module)(module, query, key, value, attention_mask, **kwargs)


def _implementation(base: str, module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]
    # eager is no registered function: each modeling file has its own (Gemma3's handles soft-capping)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise S2DError(f"{type(module).__name__} has no eager_attention_forward to wrap; load the model with "
                       "attn_implementation='sdpa'")
    return eager


def _use_wrapper(model: nn.Module, eager: bool = False) -> None:
    """Switch `model` to "s2d_kv+<its implementation>" ("s2d_kv+eager" with `eager`: softmax_bits computes the
    attention by hand, which needs the eager mask), registering that wrapper (and its masks) once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = model.config._attn_implementation or "sdpa"
    if base.startswith(PREFIX):
        if not eager or base == PREFIX + "eager":
            return
        base = "eager"
    base = "eager" if eager else base
    if base not in masks or (base != "eager" and base not in ALL_ATTENTION_FUNCTIONS):
        raise S2DError(f"KV-cache quantization, rotate_qk and softmax_bits wrap the attention implementation, but "
                       f"{base!r} is not one s2d can wrap; load the model with attn_implementation='sdpa' or 'eager'")
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, partial(_attend, base))
        AttentionMaskInterface.register(name, masks[base])  # the same masks as the wrapped implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise S2DError(f"{type(model).__name__} does not let its attention implementation be switched, which "
                       "KV-cache quantization, rotate_qk and softmax_bits need")
