"""GPTQ (Frantar et al. 2023): quantize a weight column by column, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X / n.

Follows the reference implementation: lazy block updates of `block_size` columns, act-order (columns by
descending diag(H)), dampening (`damp` x mean diag(H) added to the diagonal). Scales and zero points are
chosen once from the original weight in its original column order ("static groups"), so the integer weights
share RTN's storage format and GPTQ only decides the rounding. The model is processed block by block on
cached inputs (`s2d.arch` runner): each block's inputs come from the already quantized blocks before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
    The product is symmetric, so only its upper triangle is formed, one panel of `PANEL` rows at a time (each
    x[:, i:i+P]^T x[:, i:]): 9/16 of the work at 1536 features, 2/3 at 576, and about half the float64 additions;
    `hessian()` mirrors it once.
    """

    PANEL = 192

    def __init__(self, n_features: int):
        self.sum = torch.zeros(n_features, n_features, dtype=torch.float64)  # upper triangle only
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        for i in range(0, x.shape[1], self.PANEL):
            self.sum[i:i + self.PANEL, i:] += x[:, i:i + self.PANEL].t() @ x[:, i:]
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise S2DError("GPTQ saw no calibration inputs for a layer; is the layer used by the forward pass?")
        upper = self.sum.triu()
        return (upper + upper.triu(1).t()) * (2.0 / self.rows)


def _per_column(t: torch.Tensor | None, shape, block_size) -> torch.Tensor | None:
    """A compact per-block tensor expanded to one value per weight element."""
    if t is None:
        return None
    elems = block_size[0] * block_size[1]
    return from_blocks(t.unsqueeze(-1).expand(*t.shape, elems), tuple(shape), block_size)


PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
PARALLEL_FACTOR_MIN = 1024  # input columns from which the factorization takes all threads (~40 ms at 1536;
# at 576 it is ~3 ms, less than waking a second thread can cost on a busy machine)


def _precision(precision: str | torch.dtype) -> torch.dtype:
    if isinstance(precision, torch.dtype) and precision in PRECISIONS.values():
        return precision
    if isinstance(precision, str) and precision in PRECISIONS:
        return PRECISIONS[precision]
    raise S2DError(f"unknown GPTQ precision {precision!r}; use one of {', '.join(PRECISIONS)}")


@contextmanager
def _num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """U, upper triangular, with H^-1 = U^T U: what the reference computes as cholesky(cholesky_inverse(
    cholesky(H)), upper=True), from one factorization and one triangular inverse. With J the exchange matrix,
    J H J = L L^T gives H = (J L J)(J L J)^T, J L J upper, so U = (J L J)^-1 = J L^-1 J. It never forms H^-1,
    whose own factorization is the step that fails first in float32."""
    chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if info.item() != 0:
        raise S2DError("the GPTQ Hessian is not positive definite even after dampening: raise gptq_damp "
                       "(e.g. 0.1), give more calibration data, or use gptq_precision=float64")
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                         damp: float = 0.01, act_order: bool = True, precision: str | torch.dtype = "float32"):
    """(integer weight, scale, zero point) for `weight` (out x in) given the Hessian of its inputs.

    `precision` ("float32" or "float64") is the dtype of the factorization, the column loop and the block
    updates. float32 is the reference implementation's and several times faster; float64 gives the same codes
    on all but a few entries whose value lies within rounding error of a rounding boundary.

    Only the factorization of a large Hessian (the one O(n^3) step) uses torch's threads. Everything else is a
    long chain of small ops, microseconds each, that run in one thread: splitting them costs more in
    synchronisation than it saves, and stalls for a timeslice whenever another core is busy (measured: the
    column loop ran 10x slower with 2 threads on a shared 2-core machine).
    """
    dtype = _precision(precision)
    n_out, n_in = weight.shape
    if hessian.shape != (n_in, n_in):
        raise S2DError(f"the Hessian is {tuple(hessian.shape)}, but the weight has {n_in} input columns")
    threads = torch.get_num_threads()
    with _num_threads(1):
        return _gptq(weight.detach(), hessian.detach(), spec, block_size, damp, act_order, dtype, threads)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int, damp: float,
          act_order: bool, dtype: torch.dtype, threads: int):
    n_out, n_in = weight.shape
    qblock = spec.block_size(weight.shape)
    scale, zero = choose_qparams(weight.float(), spec, qblock)

    h = hessian.to(dtype, copy=True)  # summed in float64 (HessianAccumulator), converted once here
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n_in)
    h = h[perm][:, perm]
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    with _num_threads(threads if n_in >= PARALLEL_FACTOR_MIN else 1):
        hinv = _upper_cholesky_of_inverse(h)
    del h
    # The weight is worked on transposed, one contiguous row per input column (in act order): each column step
    # reads one row and updates the rows after it in place (addr_), the lazy update is one in-place matmul.
    wt = torch.index_select(weight.t().to(dtype), 0, perm)
    wt[dead[perm]] = 0.0
    st = torch.index_select(_per_column(scale, weight.shape, qblock).t().to(dtype), 0, perm)
    zt = None if zero is None else torch.index_select(_per_column(zero, weight.shape, qblock).t().to(dtype), 0, perm)
    err = torch.empty(min(block_size, n_in), n_out, dtype=dtype)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        _quantize_block(wt[i1:i2], st[i1:i2], None if zt is None else zt[i1:i2], hinv[i1:i2, i1:i2],
                        err[: i2 - i1], spec.qmin, spec.qmax)
        if i2 < n_in:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err[: i2 - i1], alpha=-1)
    # Row j of `wt` still holds column j as it was when quantized (the updates only touch the rows after it),
    # so the codes come out of one vectorised pass: the very arithmetic of the column step, element by element.
    codes = torch.div(wt, st).round_()
    if zt is not None:
        codes.add_(zt)
    codes = codes.clamp_(spec.qmin, spec.qmax)[torch.argsort(perm)].t()
    return codes.to(spec.int_dtype), scale, zero


SUB_BLOCK = 32  # columns of a lazy block whose rank-1 updates stay among themselves


def _quantize_block(w1: torch.Tensor, s1: torch.Tensor, z1: torch.Tensor | None, hinv1: torch.Tensor,
                    e1: torch.Tensor, qmin: int, qmax: int) -> None:
    """GPTQ's column loop over one lazy block, on transposed rows: row i is quantized with scale s1[i] (zero z1[i]),
    its error divided by hinv1[i, i] goes to e1[i], and the rows after it take the error times hinv1[i, i+1:].

    The block is split once more, into sub-blocks of SUB_BLOCK rows: the rank-1 updates run within a sub-block,
    and the rows after it take the sub-block's errors in one matmul, as the lazy update does for the rows after
    the block. The same sums in another order; the rank-1 updates (the loop's largest single op) touch 4x fewer
    rows, which takes ~20% off the loop at 1536 outputs.
    """
    n = w1.shape[0]
    rows, scales, errs, hrows, diag = w1.unbind(0), s1.unbind(0), e1.unbind(0), hinv1.unbind(0), hinv1.diagonal()
    zs = (None,) * n if z1 is None else z1.unbind(0)
    r = torch.empty_like(rows[0])
    for j1 in range(0, n, SUB_BLOCK):
        j2 = min(j1 + SUB_BLOCK, n)
        for i in range(j1, j2):
            col, s, z = rows[i], scales[i], zs[i]
            torch.div(col, s, out=r).round_()
            if z is None:
                r.clamp_(qmin, qmax)
            else:
                r.add_(z).clamp_(qmin, qmax).sub_(z)
            torch.sub(col, r.mul_(s), out=r)
            torch.div(r, diag[i], out=errs[i])
            if i + 1 < j2:
                w1[i + 1:j2].addr_(hrows[i][i + 1:j2], errs[i], alpha=-1)
        if j2 < n:
            w1[j2:].addmm_(hinv1[j1:j2, j2:].t(), e1[j1:j2], alpha=-1)


def _input_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the weight multiplies: the input after the module's online rotation, if it has one."""
    rotation = getattr(module, "rotation", None)
    return rotation(x) if rotation is not None else x


@torch.no_grad()
def gptq_model(model: nn.Module, calib, w_spec: QuantSpec | dict[str, QuantSpec | None],
               make: Callable[[nn.Linear, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, str],
                              nn.Module], filter: Callable[[nn.Module, str], bool] | None = None,
               block_size: int = 128, damp: float = 0.01, act_order: bool = True, chunk_size: int = 8,
               progress: bool = True, precision: str = "float32") -> None:
    """Quantize every targeted Linear with GPTQ, block by block; `make(linear, q, scale, zero, name)` builds each
    replacement module.

    `w_spec` is one spec for all, or one per Linear name (mixed precision); a Linear whose spec is None keeps
    floating-point weights and is handed to `make` with q, scale and zero None."""
    spec_of = w_spec.__getitem__ if isinstance(w_spec, dict) else (lambda name: w_spec)
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
        accs = _collect_hessians(desc, i, [(n, m) for n, m in targets if spec_of(n) is not None], hidden, cached)
        for name, module in targets:
            q = scale = zero = None
            if spec_of(name) is not None:
                q, scale, zero = gptq_quantize_weight(module.weight, accs[name].hessian(), spec_of(name), block_size,
                                                      damp, act_order, precision)
            set_module(model, name, make(module, q, scale, zero, name))
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

