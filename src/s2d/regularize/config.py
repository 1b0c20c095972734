"""Configs of the regularizers. Defaults follow SPEC §2 (τ 0.95, K_max 3, m 100, n 2, λ 5e-4)."""

from __future__ import annotations

from dataclasses import dataclass

from s2d.arch import ROLES
from s2d.config import Config
from s2d.errors import S2DError


@dataclass
class S2DConfig(Config):
    """Selective Spectral Decay: decay only the top singular components selected by PCDR."""

    lam: float = 5e-4
    power: int = 2  # n: component k is penalized with weight σ_kⁿ
    tau: float = 0.95  # PCDR threshold that selects k_target
    k_max: int = 3
    refresh_every: int = 100  # m: steps between SVD/PCDR refreshes
    form: str = "coupled"  # "coupled": a loss term through the optimizer; "decoupled": applied after the step
    reduction: str = "mean"  # coupled loss: mean or sum over targeted layers
    selection: str = "pcdr"  # "pcdr": k_target from PCDR ≥ τ; "all": k_max components on every layer
    pcdr_rows: str = "all"  # aggregate PCDR over "all" captured rows or only the "outliers" (top 1% |y|)
    max_rows: int = 512  # input rows kept per layer for PCDR
    svd: str = "subspace"  # "subspace": warm-started block power iteration; "full": dense SVD
    svd_iters: int = 4
    fold_norms: bool = False  # fold pre-norm gains into the Linears first, so S2D sees norm-made outliers
    # "all" block Linears, or a comma list of the adapters' roles: "o,down,fc2" aims S2D at the Linears that write
    # the residual stream, where a ViT's or an LLM's massive activations are made
    roles: str = "all"

    def role_list(self) -> tuple[str, ...] | None:
        """The roles S2D is restricted to, None for every block Linear."""
        if self.roles.strip() == "all":
            return None
        return tuple(r.strip() for r in self.roles.split(",") if r.strip())

    def validate(self) -> S2DConfig:
        if self.lam < 0:
            raise S2DError(f"lam must be ≥ 0 (got {self.lam})")
        if not 0 < self.tau <= 1:
            raise S2DError(f"tau must be in (0, 1] (got {self.tau})")
        if self.k_max < 1 or self.refresh_every < 1 or self.max_rows < 1 or self.power < 0:
            raise S2DError("k_max, refresh_every and max_rows must be ≥ 1 and power ≥ 0")
        for name, allowed in (("form", ("coupled", "decoupled")), ("reduction", ("mean", "sum")),
                              ("selection", ("pcdr", "all")), ("pcdr_rows", ("all", "outliers")),
                              ("svd", ("subspace", "full"))):
            if getattr(self, name) not in allowed:
                raise S2DError(f"{name} must be one of {allowed} (got {getattr(self, name)!r})")
        roles = self.role_list()
        unknown = sorted(set(roles or ()) - set(ROLES))
        if roles == () or unknown:
            raise S2DError(f"roles must be 'all' or a comma list of {', '.join(ROLES)} (got {self.roles!r})")
        return self


@dataclass
class WeightDecayConfig(Config):
    lam: float = 1e-2
    form: str = "decoupled"
    reduction: str = "mean"


@dataclass
class SpectralNormConfig(Config):
    """Yoshida & Miyato (2017): λ/2 Σ σ₁², σ₁ from one power iteration per step with persistent vectors."""

    lam: float = 5e-4
    reduction: str = "mean"
    power_iters: int = 1


@dataclass
class KUREConfig(Config):
    """Shkolnik et al. (2020): λ · (kurtosis(W) − target)², pushing weights towards a uniform-like shape."""

    lam: float = 1e-2
    target: float = 1.8
    reduction: str = "mean"
