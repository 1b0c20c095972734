"""Baseline regularizers with the same interface as S2D: weight decay, spectral norm, KURE."""

from __future__ import annotations

import torch
from torch import nn

from s2d.regularize.base import Filter, Regularizer
from s2d.regularize.config import KUREConfig, SpectralNormConfig, WeightDecayConfig


class WeightDecay(Regularizer):
    """Plain L2 on the targeted weights, coupled (λ/2‖W‖² in the loss) or decoupled (AdamW-style)."""

    def __init__(self, model: nn.Module, config: WeightDecayConfig | None = None, filter: Filter | None = None):
        self.config = config or WeightDecayConfig()
        super().__init__(model, filter, self.config.reduction)

    def penalty(self) -> torch.Tensor:
        if self.config.form == "decoupled":
            return self._zero()
        total = sum(lin.weight.pow(2).sum() for lin in self.targets.values())
        return 0.5 * self.config.lam * self._scale() * total

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        if self.config.form == "decoupled":
            for lin in self.targets.values():
                lin.weight.mul_(1 - lr * self.config.lam)
        super().step()


class SpectralNorm(Regularizer):
    """λ/2 Σ σ₁², with σ₁ = uᵀWv from power iteration on persistent vectors (Yoshida & Miyato 2017)."""

    def __init__(self, model: nn.Module, config: SpectralNormConfig | None = None, filter: Filter | None = None):
        self.config = config or SpectralNormConfig()
        super().__init__(model, filter, self.config.reduction)
        gen = torch.Generator().manual_seed(0)
        self.vectors = {}
        for name, lin in self.targets.items():
            v = torch.randn(lin.in_features, generator=gen, dtype=lin.weight.dtype)
            self.vectors[name] = (torch.zeros(lin.out_features, dtype=lin.weight.dtype), v / v.norm())

    def penalty(self) -> torch.Tensor:
        total = self._zero()
        for name, lin in self.targets.items():
            u, v = self.vectors[name]
            with torch.no_grad():
                w = lin.weight
                for _ in range(self.config.power_iters):
                    u = w @ v
                    u = u / u.norm().clamp_min(1e-12)
                    v = w.T @ u
                    v = v / v.norm().clamp_min(1e-12)
                self.vectors[name] = (u, v)
            total = total + (u @ lin.weight @ v) ** 2
        return 0.5 * self.config.lam * self._scale() * total

    def state_dict(self) -> dict:
        return {"steps": self.steps, "u": {n: uv[0] for n, uv in self.vectors.items()},
                "v": {n: uv[1] for n, uv in self.vectors.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.vectors = {n: (state["u"][n], state["v"][n]) for n in self.vectors}


def kurtosis(w: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis E[(w−μ)⁴]/σ⁴ of all entries (3 for a Gaussian, 1.8 for a uniform)."""
    centred = w - w.mean()
    var = centred.pow(2).mean()
    return centred.pow(4).mean() / var.pow(2).clamp_min(1e-30)


class KURE(Regularizer):
    """λ · (kurtosis(W) − target)² per layer (Shkolnik et al. 2020)."""

    def __init__(self, model: nn.Module, config: KUREConfig | None = None, filter: Filter | None = None):
        self.config = config or KUREConfig()
        super().__init__(model, filter, self.config.reduction)

    def penalty(self) -> torch.Tensor:
        total = sum((kurtosis(lin.weight) - self.config.target) ** 2 for lin in self.targets.values())
        return self.config.lam * self._scale() * total
