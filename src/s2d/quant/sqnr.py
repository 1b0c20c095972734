"""Per-Linear SQNR of a quantized model's outputs against full precision, so a report shows which layers break.

Two numbers per quantized Linear, both 10 log10(sum y^2 / sum (y_q - y)^2) in dB over the batch:
- `local_db`: the layer's own error. Its quantized output against the full-precision layer's output on the
  *same* input (the one arriving in the quantized model): weight plus input quantization of this layer only.
- `accumulated_db`: its quantized output in the quantized model against its output in the full-precision
  model on the same tokens: the error of everything upstream too.
The reference is the model after the function-preserving baselines (rotation/SmoothQuant), before quantization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from s2d.arch import describe
from s2d.arch.runner import model_inputs
from s2d.quant.calib import CalibBatch, iter_chunks
from s2d.quant.linear import QuantLinear


def db(signal: float, noise: float) -> float:
    """10 log10(signal / noise). A noiseless output gets a finite ceiling (noise floored at 1e-300, ≥ 3000 dB)
    rather than +inf, so that an Inf in metrics.json always means an overflow."""
    return 10.0 * math.log10(max(signal, 1e-300) / max(noise, 1e-300))


@torch.no_grad()
def layer_sqnr(reference: nn.Module, quantized: nn.Module, batch: CalibBatch, chunk_size: int = 1) -> dict[str, dict]:
    """{layer name: {role, block, local_db, accumulated_db}} for every QuantLinear in `quantized`."""
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    roles = {lin.name: (lin.role, lin.block) for lin in describe(reference).linears()}
    sums = {n: [0.0, 0.0, 0.0, 0.0] for n in layers}  # local signal, local noise, accumulated signal, noise
    desc_ref, desc_q = describe(reference), describe(quantized)
    ref_out: dict[str, torch.Tensor] = {}
    # `keep` records only during the reference model's own forward: `compare` calls the reference Linear on
    # the quantized model's input, which fires the same hook and would overwrite the accumulated reference
    # with the local one (then accumulated_db == local_db for every Linear).
    in_reference = [False]

    def keep(name):
        def fn(module, args, out):
            if in_reference[0]:
                ref_out[name] = out.detach()
        return fn

    def compare(name):
        ref_module = reference.get_submodule(name)

        def fn(module, args, out):
            local_ref = ref_module(args[0]).double()
            y, acc_ref = out.double(), ref_out.pop(name).double()
            s = sums[name]
            s[0] += local_ref.pow(2).sum().item()
            s[1] += (y - local_ref).pow(2).sum().item()
            s[2] += acc_ref.pow(2).sum().item()
            s[3] += (y - acc_ref).pow(2).sum().item()
        return fn

    handles = [reference.get_submodule(n).register_forward_hook(keep(n)) for n in layers]
    handles += [m.register_forward_hook(compare(n)) for n, m in layers.items()]
    try:
        for chunk in iter_chunks(batch, chunk_size):
            in_reference[0] = True
            reference(**model_inputs(desc_ref, chunk))
            in_reference[0] = False
            quantized(**model_inputs(desc_q, chunk))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (ls, ln, as_, an) in sums.items():
        role, block = roles.get(name, ("head" if name == desc_q.head else "?", -1))  # the head is in no block
        out[name] = {"role": role, "block": block, "local_db": db(ls, ln), "accumulated_db": db(as_, an)}
    return out
