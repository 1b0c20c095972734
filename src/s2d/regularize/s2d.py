"""Selective Spectral Decay: decay only the top singular components of each targeted weight.

    L_S2D = λ/(n+1) Σ_{k ≤ k_target} σ_k^{n+1},    gradient  λ Σ_k σ_kⁿ u_k v_kᵀ

The coupled form adds the cheap surrogate λ Σ σ_kⁿ (u_kᵀ W v_k) (same gradient, factors detached from the
cached SVD) to the loss. The decoupled form skips the optimizer: W ← W − η λ Σ σ_kⁿ u_k v_kᵀ after each step,
so σ_k ← σ_k − η λ σ_kⁿ exactly and the decay rate is explicit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from s2d.arch import fold_norm_gains
from s2d.errors import S2DError
from s2d.regularize.base import Filter, Regularizer
from s2d.regularize.config import S2DConfig
from s2d.spectral import pcdr, top_singular


class SelectiveSpectralDecay(Regularizer):
    def __init__(self, model: nn.Module, config: S2DConfig | None = None, filter: Filter | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        self.config = (config or S2DConfig()).validate()
        super().__init__(model, filter, self.config.reduction)
        self._keep_roles(self.config.role_list())
        if self.config.fold_norms:
            self.folded = fold_norm_gains(self.desc)
        for name, lin in self.targets.items():
            if self.config.k_max > min(lin.weight.shape):
                raise S2DError(f"k_max={self.config.k_max} exceeds the rank of {name} {tuple(lin.weight.shape)}")
        self.optimizer = optimizer
        self.factors: dict[str, dict] = {}  # name -> u, s, v (float64), k_target, pcdr, basis
        self._inputs: dict[str, torch.Tensor] = {}
        self._refreshed_at = -1
        self._hooks = [lin.register_forward_pre_hook(self._capture(name)) for name, lin in self.targets.items()]

    def _keep_roles(self, roles: tuple[str, ...] | None) -> None:
        if roles is None:
            return
        named = {lin.name for lin in self.desc.linears(roles)}
        self.targets = {name: lin for name, lin in self.targets.items() if name in named}
        if not self.targets:
            raise S2DError(f"roles={','.join(roles)} select no Linear of this model; its roles are "
                           f"{', '.join(self.desc.role_counts())}")

    # -- input capture for PCDR -------------------------------------------------------------------------------

    def _capture_due(self) -> bool:
        return self.config.selection == "pcdr" and self.steps % self.config.refresh_every == 0 \
            and self._refreshed_at != self.steps

    def _capture(self, name: str):
        def hook(module, args):
            if self._capture_due():
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                if x.shape[0] > self.config.max_rows:  # an even spread of rows, deterministic
                    x = x[torch.linspace(0, x.shape[0] - 1, self.config.max_rows).long()]
                self._inputs[name] = x.to(torch.float32, copy=True)
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- refresh ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self, inputs: dict[str, torch.Tensor] | None = None) -> dict:
        """Recompute the top-K triplets and, from PCDR on captured inputs, each layer's k_target."""
        cfg = self.config
        inputs = inputs if inputs is not None else self._inputs
        record = {"step": self.steps, "layers": {}}
        for i, (name, lin) in enumerate(self.targets.items()):
            old = self.factors.get(name, {})
            u, s, v = top_singular(lin.weight, cfg.k_max, cfg.svd, cfg.svd_iters, old.get("basis"), seed=i)
            if cfg.selection == "all":
                k_target, ratios = cfg.k_max, None
            elif name in inputs:
                ratios = pcdr(inputs[name], lin.weight, u, s, v, cfg.pcdr_rows)
                passing = (ratios >= cfg.tau).nonzero()
                k_target = int(passing[0]) + 1 if len(passing) else 0
            else:
                k_target, ratios = 0, None  # never seen an input: no evidence that it is spectrally driven
            basis = self._basis(lin.weight, v)
            self.factors[name] = {"u": u, "s": s, "v": v, "k_target": k_target, "basis": basis}
            record["layers"][name] = {"k_target": k_target, "sigma": s.tolist(),
                                      "pcdr": None if ratios is None else ratios.tolist()}
        _agree_across_ranks(self.factors, record)
        record["penalty_value"] = self.objective()
        self._inputs = {}
        self._refreshed_at = self.steps
        self.log.append(record)
        return record

    def _basis(self, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """The warm start for the next subspace iteration: V padded to the oversampled width."""
        width = min(min(weight.shape), self.config.k_max + 8)
        if self.config.svd != "subspace" or width <= v.shape[1]:
            return None
        gen = torch.Generator().manual_seed(self.steps)
        pad = torch.randn(v.shape[0], width - v.shape[1], generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.cat([v, pad], dim=1))
        return q

    def _maybe_refresh(self) -> None:
        if self._refreshed_at != self.steps and self.steps % self.config.refresh_every == 0:
            self.refresh()

    def objective(self) -> float:
        """L_S2D = λ/(n+1) Σ σ_k^{n+1} over the selected components, from the cached σ (for logging)."""
        n = self.config.power
        total = sum(float((f["s"][: f["k_target"]] ** (n + 1)).sum()) for f in self.factors.values())
        return self.config.lam * self._scale() * total / (n + 1)

    # -- penalty and step -------------------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        self._maybe_refresh()
        if self.config.form == "decoupled":
            return self._zero()
        total = self._zero()
        for name, lin in self.targets.items():
            f = self.factors[name]
            k = f["k_target"]
            if k == 0:
                continue
            u, v = f["u"][:, :k].to(lin.weight.dtype), f["v"][:, :k].to(lin.weight.dtype)
            coeff = (f["s"][:k] ** self.config.power).to(lin.weight.dtype)
            # Σ_k σ_kⁿ u_kᵀ W v_k: its gradient in W is exactly Σ_k σ_kⁿ u_k v_kᵀ
            total = total + (coeff * ((u.T @ lin.weight) * v.T).sum(dim=1)).sum()
        return self.config.lam * self._scale() * total

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        self._maybe_refresh()
        if self.config.form == "decoupled":
            lr = self._lr() if lr is None else lr
            n, lam = self.config.power, self.config.lam
            for name, lin in self.targets.items():
                f = self.factors[name]
                k = f["k_target"]
                if k == 0:
                    continue
                shrink = lr * lam * f["s"][:k] ** n
                update = (f["u"][:, :k] * shrink) @ f["v"][:, :k].T
                lin.weight.sub_(update.to(lin.weight.dtype))
                f["s"] = torch.cat([f["s"][:k] - shrink, f["s"][k:]])  # the cached σ tracks the decay
        super().step()

    def _lr(self) -> float:
        if self.optimizer is None:
            raise S2DError("the decoupled form needs the learning rate: pass optimizer= or call step(lr=...)")
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpointing ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"steps": self.steps, "refreshed_at": self._refreshed_at,
                "factors": {n: {k: (torch.tensor(v) if isinstance(v, int) else v) for k, v in f.items()
                                if v is not None} for n, f in self.factors.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._refreshed_at = int(state["refreshed_at"])
        self.factors = {}
        for name, f in state["factors"].items():
            f = dict(f)
            f["k_target"] = int(f["k_target"])
            f.setdefault("basis", None)
            self.factors[name] = f


def _agree_across_ranks(factors: dict, record: dict) -> None:
    """Under data parallelism each rank saw different inputs, so PCDR (and k_target) may differ: rank 0's
    selection and factors are broadcast so that every replica applies the same penalty."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for name, f in factors.items():
        for key in ("u", "s", "v"):
            dist.broadcast(f[key], src=0)
        k = torch.tensor([f["k_target"]])
        dist.broadcast(k, src=0)
        f["k_target"] = int(k)
        record["layers"][name]["k_target"] = f["k_target"]
