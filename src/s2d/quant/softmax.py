"""RepQ-ViT's log√2 quantizer of the post-softmax attention probabilities, and the eager attention it runs in.

Attention probabilities lie in [0, 1], mostly tiny with a few large ones: a uniform grid spends its levels on the
large ones and rounds most of the rest to 0. RepQ-ViT (Li et al., 2023) rounds them on a log√2 grid instead: with a
per-layer scale delta, the code q = round(-2·log2(p / delta)) is clamped to [0, 2^b - 1] and decodes to
delta·2^(-q/2), computed as delta·2^(-ceil(q/2))·(1 + (√2 - 1)·(q mod 2)) (a shift, and one √2 for odd codes);
a code of 2^b or more (p below the grid's smallest level, p = 0 included) decodes to 0.

delta is calibrated per layer: the candidates are 1.0, the largest probability and high quantiles of the first
calibration batch's probabilities, and the one with the least squared error summed over every calibration batch
is kept (the `delta` buffer, so it is in the state dict).

The probabilities exist only inside attention. s2d.quant.kvcache attaches a LogSqrt2Quant to each attention module
and, for modules that call transformers' AttentionInterface, routes them to `eager_attention` below (after its R3
and KV-cache rounding, so both compose); MPNet computes its own softmax, and a pre-hook on the dropout it applies to
the probabilities quantizes them there.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from s2d.errors import S2DError
from s2d.quant.primitives import check_bits

QUANTILES = (0.999, 0.9999, 0.99999)
MAX_SAMPLE = 1 << 24  # torch.quantile's input limit: a larger batch is subsampled evenly for the candidates


def log_sqrt2_quantize(p: torch.Tensor, delta: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Fake-quantize probabilities p ≥ 0 on RepQ-ViT's log√2 grid of 2^bits levels below `delta`."""
    levels = 2**bits
    code = torch.round(-2 * torch.log2(p / delta))
    under = code >= levels  # below the smallest level; p = 0 gives +inf
    code = code.clamp(0, levels - 1)
    value = delta * torch.exp2(-torch.ceil(code / 2)) * (1 + (math.sqrt(2) - 1) * code.remainder(2))
    return torch.where(under, torch.zeros_like(value), value)


def candidate_deltas(p: torch.Tensor) -> torch.Tensor:
    """The deltas calibration tries: 1.0, max(p) and the QUANTILES of p (the positive ones)."""
    flat = p.detach().reshape(-1).float()
    if flat.numel() > MAX_SAMPLE:
        flat = flat[:: math.ceil(flat.numel() / MAX_SAMPLE)]
    quantiles = torch.quantile(flat, torch.tensor(QUANTILES, dtype=flat.dtype, device=flat.device))
    out = torch.cat([torch.ones(1, device=flat.device), flat.max().reshape(1), quantiles])
    return out[out > 0]  # a zero delta would decode everything to 0 (and 0/0 to NaN)


class LogSqrt2Quant(nn.Module):
    """The post-softmax quantizer of one attention layer: a calibrated `delta` buffer and the log√2 grid."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits, "softmax_bits")
        self.register_buffer("delta", torch.ones(()))
        self.calibrating = False
        # What the last calibration tried (not saved): the candidate deltas and their summed squared errors.
        self.candidates: torch.Tensor | None = None
        self.errors: torch.Tensor | None = None

    def start_calibration(self) -> None:
        self.calibrating, self.candidates, self.errors = True, None, None

    @torch.no_grad()
    def observe(self, p: torch.Tensor) -> None:
        if self.candidates is None:
            self.candidates = candidate_deltas(p)
            self.errors = torch.zeros(len(self.candidates), dtype=torch.float64)
        for i, delta in enumerate(self.candidates.to(p.dtype)):
            self.errors[i] += (log_sqrt2_quantize(p, delta, self.bits) - p).double().pow(2).sum().cpu()

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if not self.calibrating:
            return
        self.calibrating = False
        if self.candidates is None:
            raise S2DError("softmax_bits: an attention layer saw no probabilities during calibration; check that the "
                           "calibration batch runs through the model's attention")
        self.delta.copy_(self.candidates[int(self.errors.argmin())])

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if self.calibrating:  # observe the float probabilities, pass them on unrounded
            self.observe(p)
            return p
        return log_sqrt2_quantize(p, self.delta.to(p.dtype), self.bits)

    def extra_repr(self) -> str:
        return f"softmax_bits={self.bits}, delta={float(self.delta):.4g}"


def check_reproducible(module: nn.Module, softcap: float | None = None, **kwargs) -> None:
    """Raise if `module`'s attention does something eager_attention does not (logit soft-capping, sinks)."""
    cap = softcap if softcap is not None else getattr(module, "attn_logit_softcapping", None)
    if cap is not None:
        raise S2DError(f"{type(module).__name__} soft-caps its attention logits (at {cap}), which softmax_bits' "
                       "eager attention does not reproduce; drop softmax_bits for this model")
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise S2DError(f"{type(module).__name__} uses attention sinks, which softmax_bits' eager attention does not "
                       "reproduce; drop softmax_bits for this model")


def eager_attention(quant: LogSqrt2Quant, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
                    dropout: float = 0.0, softcap: float | None = None, **kwargs):
    """Attention as transformers' eager code computes it, with the probabilities quantized by `quant`.

    q, k, v are (batch, heads, seq, head_dim); grouped KV heads are repeated for their query heads; the mask is
    the eager (additive, float) one, which also carries causal and sliding-window patterns."""
    check_reproducible(module, softcap, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: KV head j serves query heads j·groups ... (j+1)·groups - 1
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = quant(F.softmax(scores, dim=-1, dtype=torch.float32)).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs
