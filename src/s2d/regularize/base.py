"""What every regularizer shares: the targeted Linears, the step counter and checkpointable state."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from s2d.arch import describe
from s2d.errors import S2DError

Filter = Callable[[nn.Module, str], bool]


class Regularizer:
    """Use in any loop: `loss = task_loss + reg.penalty()`, then `optimizer.step(); reg.step()`."""

    def __init__(self, model: nn.Module, filter: Filter | None = None, reduction: str = "mean"):
        self.model = model
        self.desc = describe(model)
        keep = filter or self.desc.is_target
        self.targets: dict[str, nn.Linear] = {lin.name: lin.module for lin in self.desc.linears()
                                              if keep(lin.module, lin.name)}
        if not self.targets:
            raise S2DError("the filter selects no Linear: check its role or name conditions")
        self.reduction = reduction
        self.steps = 0
        self.log: list[dict] = []

    def _scale(self) -> float:
        return 1.0 / len(self.targets) if self.reduction == "mean" else 1.0

    def penalty(self) -> torch.Tensor:
        """The term to add to the task loss (zero for a purely decoupled regularizer)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        """Call once after each optimizer step; decoupled forms apply their update here."""
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def _zero(self) -> torch.Tensor:
        return next(iter(self.targets.values())).weight.new_zeros(())

    def remove(self) -> None:
        """Detach any hooks; the regularizer is unusable afterwards."""
