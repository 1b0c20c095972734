"""Learned rotations (SpinQuant-style): turn a rotated model's R1 (and R2) to lower the quantized model's loss.

`rotate_model` leaves the residual stream turned by a randomized Hadamard H. Any orthogonal U on top (H U) is
just as exact in floating point, but rounds differently, so U is learned: the model's next-token loss on
calibration text, with every targeted Linear's input fake-quantized as the config will quantize it (and its
weight too when the weights will be rounded by RTN; GPTQ rounds weights after the rotation is fixed, so they
stay in floating point here, as SpinQuant does), is minimised over U on the orthogonal group by Cayley SGD.

During learning the model is not turned at all: the stream stays in the Hadamard basis, and only the
roundings see the turned one. A reader's input x is rounded as q(x U) Uᵀ, which is exactly what the turned
model computes, q(x U)(W U)ᵀ; writers and the embedding need nothing, since rounding never touches their
outputs. With RTN weights each weight is rounded the same way, Aᵀ q(A W T) Tᵀ (a weight parametrization).
R2 turns o's input and v's output head by head with one head_dim U per block. This costs a few
tokens × d² products per block instead of re-turning every weight each step (10× cheaper on SmolLM2). At
the end U is folded into the weights in float64 by the same functions that fold H, so nothing runs online
and a saved model needs nothing new to reload.

Written here rather than taken from a library: no maintained package offers Stiefel-manifold optimisers for
plain torch modules, and the retraction is a few lines.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from s2d.arch import describe
from s2d.errors import S2DError
from s2d.quant.calib import CalibBatch, require_calib
from s2d.quant.config import QuantConfig
from s2d.quant.primitives import fake_quantize
from s2d.quant.rotate import Rotation, head_sides, residual_sides, turn_head, turn_residual
from s2d.quant.swap import leaf_filter


class _Turn(nn.Module):
    """x -> x U on the last dimension, or within each head_dim slice of it (R2); `inverse` is x -> x Uᵀ."""

    def __init__(self, u: nn.Parameter, per_head: bool = False):
        super().__init__()
        self.u, self.per_head = u, per_head

    def _apply(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if not self.per_head:
            return x @ u
        return (x.reshape(*x.shape[:-1], -1, u.shape[0]) @ u).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self.u)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self.u.t())


class _RoundedTurned(nn.Module):
    """A weight rounded in the turned basis and brought back: W -> Aᵀ q(A W T) Tᵀ, with T the input turn and
    A the output turn (Uᵀ W = (Wᵀ U)ᵀ, so both act on a last dimension)."""

    def __init__(self, spec, turn_in: _Turn | None, turn_out: _Turn | None):
        super().__init__()
        self.spec, self.turn_in, self.turn_out = spec, turn_in, turn_out

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.turn_out is not None:
            w = self.turn_out(w.t()).t()
        if self.turn_in is not None:
            w = self.turn_in(w)
        w = _ste(w, self.spec)
        if self.turn_in is not None:
            w = self.turn_in.inverse(w)
        if self.turn_out is not None:
            w = self.turn_out.inverse(w.t()).t()
        return w


def cayley_step(u: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One descent step on the orthogonal group: U <- (I + a/2 A)^-1 (I - a/2 A) U with A = G Uᵀ - U Gᵀ.

    A is skew-symmetric, so the Cayley transform is orthogonal and U stays orthogonal to rounding; -A U is
    the loss's gradient projected on the manifold's tangent space. The step a is capped at 1/||A||_1 (as
    SpinQuant's optimiser does), which keeps a learning rate of order 1 stable whatever the gradient's scale.
    """
    u64, g64 = u.double(), grad.double()
    a = g64 @ u64.t() - u64 @ g64.t()
    step = min(lr, 1.0 / (torch.linalg.matrix_norm(a, ord=1).item() + 1e-8))
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    return torch.linalg.solve(eye + step / 2 * a, (eye - step / 2 * a) @ u64).to(u.dtype)


def _ste(x: torch.Tensor, spec) -> torch.Tensor:
    return x + (fake_quantize(x, spec) - x).detach()  # rounding in the forward, identity in the backward


@torch.no_grad()
def learn_rotations(model: nn.Module, config: QuantConfig, calib: CalibBatch, progress: bool = True) -> dict:
    """Learn U1 (and U2 per block with `config.rotate_heads`) on a model `rotate_model` has already rotated,
    fold them in, and return the loss history ({"loss": [...], "steps": n, ...})."""
    require_calib(calib, "learned rotations (the loss they minimise)")
    if not config.rotate or not getattr(model, "s2d_rotated", False):
        raise S2DError("learned rotations turn a rotated model: use them with --rotate (rotate_model first)")
    desc = describe(model)
    d = desc.module(desc.embeddings).weight.shape[1]
    u1 = nn.Parameter(torch.eye(d))
    u2 = {b.index: nn.Parameter(torch.eye(desc.head_dim)) for b in desc.blocks} if config.rotate_heads else {}
    for p in model.parameters():
        p.requires_grad_(False)
    undo = _round_in_turned_basis(model, desc, config, _turns(desc, u1, u2))
    held = calib[: max(config.learn_rotation_batch, 2)]  # the same sequences before and after: comparable
    try:
        before = float(model(input_ids=held, labels=held, use_cache=False).loss)
        history = _optimise(model, calib, config, [u1, *u2.values()], progress)
        history["loss_before"] = before
        history["loss_after"] = float(model(input_ids=held, labels=held, use_cache=False).loss)
    finally:
        for fn in undo:
            fn()
    turn_residual(desc, _dense(u1))
    for block in desc.blocks:
        if block.index in u2:
            turn_head(desc, block, _dense(u2[block.index]))
    history["orthogonality_error"] = max(
        float((u.double() @ u.double().t() - torch.eye(u.shape[0], dtype=torch.float64)).abs().max())
        for u in [u1, *u2.values()])
    history["distance_from_hadamard"] = float((u1.double() - torch.eye(d, dtype=torch.float64)).norm() / math.sqrt(d))
    return history


def _dense(u: torch.Tensor) -> Rotation:
    rotation = Rotation(torch.ones(u.shape[0]), [torch.eye(u.shape[0])]).double()
    rotation.factor0.copy_(u.detach().double())
    return rotation


def _turns(desc, u1: nn.Parameter, u2: dict) -> dict[int, tuple[_Turn | None, _Turn | None]]:
    """id(Linear) -> (its input turn, its output turn): U1 on the stream's readers' inputs and writers'
    outputs, U2 on o's input and v's output head by head. The embedding and head need nothing: the stream
    itself stays in the Hadamard basis, only the roundings see the turned one."""
    turns: dict[int, list] = {}
    r1 = _Turn(u1)
    for module, side in residual_sides(desc):
        turns.setdefault(id(module), [None, None])[0 if side == "right" else 1] = r1
    for block in desc.blocks:
        if block.index in u2:
            v, o = head_sides(desc, block)
            r2 = _Turn(u2[block.index], per_head=True)
            turns.setdefault(id(v), [None, None])[1] = r2
            turns.setdefault(id(o), [None, None])[0] = r2
    return {k: tuple(v) for k, v in turns.items()}


def _round_in_turned_basis(model: nn.Module, desc, config: QuantConfig, turns: dict) -> list:
    """Hooks that round each target Linear's input (after its online rotation) in its turned basis, and its
    weight when RTN will round the weights; returns the undo functions. The weight observer is min-max here:
    an MSE search every step would cost a grid of candidates per Linear per step."""
    a_spec = config.act_spec()
    w_spec = config.weight_spec() if config.method == "rtn" else None
    if w_spec is not None and w_spec.observer == "mse":
        w_spec = dataclasses.replace(w_spec, observer="minmax")
    target = leaf_filter(model, desc.is_target)
    undo, last = [], {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and target(module, name)):
            continue
        turn_in, turn_out = turns.get(id(module), (None, None))
        if a_spec is not None:
            undo.append(_round_input(module, a_spec, turn_in, last).remove)
        if w_spec is not None:
            parametrize.register_parametrization(module, "weight", _RoundedTurned(w_spec, turn_in, turn_out))
            undo.append(lambda m=module: parametrize.remove_parametrizations(m, "weight", leave_parametrized=False))
    undo.append(last.clear)
    return undo


def _round_input(module: nn.Module, spec, turn: _Turn | None, last: dict):
    rotation = getattr(module, "rotation", None)
    if rotation is not None:  # an online rotation (R4) comes first; no learned turn reads that input
        return rotation.register_forward_hook(lambda m, args, out: _ste(out, spec))

    def hook(m, args):
        # q/k/v (and gate/up) read the very same tensor: round it once, not three times. The entry holds the
        # tensor itself, so an identity match cannot be a freed tensor's reused id.
        x, key = args[0], id(turn)
        if key not in last or last[key][0] is not x:
            last[key] = x, (_ste(x, spec) if turn is None else turn.inverse(_ste(turn(x), spec)))
        return (last[key][1], *args[1:])
    return module.register_forward_pre_hook(hook)


def _optimise(model: nn.Module, calib: CalibBatch, config: QuantConfig, params: list[nn.Parameter],
              progress: bool) -> dict:
    from tqdm.auto import tqdm

    steps, batch = config.learn_rotation_steps, config.learn_rotation_batch
    starts = itertools.cycle(range(0, max(len(calib) - batch + 1, 1), batch))
    losses = []
    bar = tqdm(range(steps), desc="learning rotations", disable=not progress)
    with torch.enable_grad():
        for step in bar:
            ids = calib[next(starts):][:batch]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise S2DError(f"the quantized loss is not finite at rotation step {step}; lower "
                               "learn_rotation_lr or use more activation bits")
            grads = torch.autograd.grad(loss, params)
            lr = config.learn_rotation_lr * (1 - step / steps)  # linear decay to 0, as SpinQuant schedules it
            for p, g in zip(params, grads, strict=True):
                p.data.copy_(cayley_step(p.data, g, lr))
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return {"steps": steps, "batch": batch, "lr": config.learn_rotation_lr, "loss": losses}
