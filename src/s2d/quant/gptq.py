"""GPTQ (Frantar et al. 2023): quantize a weight column by column, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X / n.

Follows the reference implementation: lazy block updates of `block_size` columns, act-order (columns by
descending diag(H)), dampening (`damp` x mean diag(H) added to the diagonal). Scales and zero points are
chosen once from the original weight in its original column order ("static groups"), so the integer weights
share RTN's storage format and GPTQ only decides the rounding. The model is processed block by block on
cached inputs (`s2d.arch` runner): each block's inputs come from the already quantized blocks before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from s2d.arch import capture_block_inputs, describe, run_block
from s2d.errors import S2DError
from s2d.quant.calib import iter_chunks, require_calib
from s2d.quant.primitives import QuantSpec, choose_qparams, from_blocks
from s2d.quant.swap import set_module


class HessianAccumulator:
    """Streaming sum of x x^T over every row of the inputs seen: H = 2 X^T X / n.

    Each chunk's product is formed in float32 (half the time of float64 on a CPU; a chunk is a few thousand
    rows, well within float32's precision) and added to a float64 running sum, so long streams do not drift.
    """

    def __init__(self, n_features: int):
        self.sum = torch.zeros(n_features, n_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum += x.t() @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise S2DError("GPTQ saw no calibration inputs for a layer; is the layer used by the forward pass?")
        return self.sum * (2.0 / self.rows)


def _per_column(t: torch.Tensor | None, shape, block_size) -> torch.Tensor | None:
    """A compact per-block tensor expanded to one value per weight element."""
    if t is None:
        return None
    elems = block_size[0] * block_size[1]
    return from_blocks(t.unsqueeze(-1).expand(*t.shape, elems), tuple(shape), block_size)


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                         damp: float = 0.01, act_order: bool = True):
    """(integer weight, scale, zero point) for `weight` (out x in) given the Hessian of its inputs."""
    n_out, n_in = weight.shape
    if hessian.shape != (n_in, n_in):
        raise S2DError(f"the Hessian is {tuple(hessian.shape)}, but the weight has {n_in} input columns")
    qblock = spec.block_size(weight.shape)
    scale, zero = choose_qparams(weight.detach().float(), spec, qblock)
    s_full = _per_column(scale, weight.shape, qblock).double()
    z_full = _per_column(zero, weight.shape, qblock)
    z_full = None if z_full is None else z_full.double()

    w = weight.detach().double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n_in)
    w, h, s_full = w[:, perm], h[perm][:, perm], s_full[:, perm]
    z_full = None if z_full is None else z_full[:, perm]
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise S2DError("the GPTQ Hessian is not positive definite even after dampening: raise gptq_damp "
                       "(e.g. 0.1) or give more calibration data")
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)

    codes = torch.zeros_like(w)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            s = s_full[:, i1 + i]
            q = torch.round(col / s)
            if z_full is None:
                q = q.clamp_(spec.qmin, spec.qmax)
                deq = q * s
            else:
                z = z_full[:, i1 + i]
                q = (q + z).clamp_(spec.qmin, spec.qmax)
                deq = (q - z) * s
            codes[:, i1 + i] = q
            e = (col - deq) / d
            w1[:, i:].sub_(e[:, None] * hinv1[i, i:][None, :])
            err1[:, i] = e
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    codes = codes[:, torch.argsort(perm)]
    return codes.to(spec.int_dtype), scale, zero


def _input_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the weight multiplies: the input after the module's online rotation, if it has one."""
    rotation = getattr(module, "rotation", None)
    return rotation(x) if rotation is not None else x


@torch.no_grad()
def gptq_model(model: nn.Module, calib, w_spec: QuantSpec, make: Callable[[nn.Linear, torch.Tensor, torch.Tensor,
               torch.Tensor | None], nn.Module], filter: Callable[[nn.Module, str], bool] | None = None,
               block_size: int = 128, damp: float = 0.01, act_order: bool = True, chunk_size: int = 8,
               progress: bool = True) -> None:
    """Quantize every targeted Linear with GPTQ, block by block; `make(linear, q, scale, zero)` builds each
    replacement module."""
    require_calib(calib, "GPTQ (to build each layer's Hessian)")
    desc = describe(model)
    target = filter or desc.is_target
    cached = [capture_block_inputs(desc, chunk) for chunk in iter_chunks(calib, chunk_size)]
    hidden = [c.hidden for c in cached]
    names = {id(m): n for n, m in model.named_modules()}
    for i, block in enumerate(tqdm(desc.blocks, desc="GPTQ blocks", disable=not progress)):
        # every nn.Linear of the block the filter accepts, including the two inside a low-rank pair
        targets = [(names[id(m)], m) for m in block.module.modules()
                   if isinstance(m, nn.Linear) and target(m, names[id(m)])]
        accs = _collect_hessians(desc, i, targets, hidden, cached)
        for name, module in targets:
            q, scale, zero = gptq_quantize_weight(module.weight, accs[name].hessian(), w_spec, block_size,
                                                  damp, act_order)
            set_module(model, name, make(module, q, scale, zero))
        hidden = [run_block(desc, i, h, c.calls[i]) for h, c in zip(hidden, cached, strict=True)]


def _collect_hessians(desc, index, targets: list[tuple[str, nn.Linear]], hidden,
                      cached) -> dict[str, HessianAccumulator]:
    """One pass of block `index` over every chunk, accumulating each target's input Hessian.

    Linears fed the very same tensor (q/k/v, gate/up) share one accumulator: it is recognised by identity,
    with a reference held so that a freed tensor's id cannot be reused within the pass.
    """
    accs: dict[str, HessianAccumulator] = {}
    seen: list[tuple[torch.Tensor, nn.Module | None, HessianAccumulator]] = []

    def hook(name):
        def fn(module, args):
            x, rotation = args[0], getattr(module, "rotation", None)
            for prev, prev_rotation, acc in seen:
                if prev is x and prev_rotation is rotation:
                    accs.setdefault(name, acc)
                    return
            acc = accs.setdefault(name, HessianAccumulator(module.in_features))
            acc.add(_input_of(module, x))
            seen.append((x, rotation, acc))
        return fn

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in targets]
    try:
        for h, c in zip(hidden, cached, strict=True):
            seen.clear()
            run_block(desc, index, h, c.calls[index])
    finally:
        for handle in handles:
            handle.remove()
    seen.clear()
    return accs

