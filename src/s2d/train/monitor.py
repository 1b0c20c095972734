"""Cheap training-time readings: the largest residual-stream activation and the largest σ₁."""

from __future__ import annotations

import torch

from s2d.arch import describe


class ActivationMonitor:
    """Running max |x| over every block's output, reset each step; one reduction per block, no storage."""

    def __init__(self, model):
        self.max_abs = 0.0
        self._hooks = [b.module.register_forward_hook(self._hook) for b in describe(model).blocks]

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.max_abs = max(self.max_abs, float(out.detach().abs().max()))

    def reset(self) -> None:
        self.max_abs = 0.0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def sigma_max(model, iters: int = 8) -> float:
    """The largest σ₁ over the targeted Linears, by a few power iterations each (a reading, not a method)."""
    best = 0.0
    for lin in describe(model).linears():
        w = lin.module.weight.detach().float()
        v = torch.ones(w.shape[1]) / w.shape[1] ** 0.5
        for _ in range(iters):
            v = w.T @ (w @ v)
            v = v / v.norm().clamp_min(1e-30)
        best = max(best, float((w @ v).norm()))
    return best
