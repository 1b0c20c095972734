"""Rank budgets: r = floor(b·κ) per Linear, presets by fraction of the whole model kept, ranks per role.

The paper's presets for LLaMA-7B (90%: last 8 of 32 blocks at b=0.60; 80%: last 12 at 0.46; 50%: last 24 at
0.33) all sit on one line: with f the share of block-Linear parameters to remove, the share of blocks
decomposed is N/L = 0.125 + 1.25·f (0.25, 0.375 and 0.75 for f = 0.1, 0.2, 0.5). We take N from that line
and then solve b exactly for the requested count, so other models and fractions follow the same recipe.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from torch import nn

from s2d.errors import S2DError
from s2d.lowrank.factorized import break_even_rank, check_rank, dense_params, factorized_params

log = logging.getLogger(__name__)

PRESET_INTERCEPT, PRESET_SLOPE = 0.125, 1.25  # N/L = 0.125 + 1.25·f, fitted exactly by the paper's presets


@dataclass(frozen=True)
class Layer:
    """The shape of one block Linear, and whether its factorized form carries a bias."""

    name: str
    role: str
    block: int
    d_in: int
    d_out: int
    bias: bool  # the dense layer's own bias
    factor_bias: bool  # B's bias: rom always has one (mean compensation); svd/asvd only if the layer had one

    @property
    def kappa(self) -> float:
        return break_even_rank(self.d_in, self.d_out)

    @property
    def dense(self) -> int:
        return dense_params(self.d_in, self.d_out, self.bias)

    def factored(self, rank: int) -> int:
        return factorized_params(rank, self.d_in, self.d_out, self.factor_bias)

    def saves(self, rank: int) -> bool:
        return 1 <= rank <= min(self.d_in, self.d_out) and self.factored(rank) < self.dense


def layers_of(linears, method: str) -> list[Layer]:
    """Layers from `s2d.arch` LinearRefs (name, role, block, module)."""
    return [Layer(lin.name, lin.role, lin.block, lin.module.in_features, lin.module.out_features,
                  getattr(lin.module, "bias", None) is not None,
                  method == "rom" or getattr(lin.module, "bias", None) is not None) for lin in linears]


def model_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied embeddings count once), as the papers count them."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class RankPlan:
    """Which Linears to factorize at which rank, and the parameter counts this leads to."""

    ranks: dict[str, int]
    layers: list[Layer]  # every block Linear (for the block-Linear fraction and MACs)
    model_params: int  # the whole model before compression
    b: float | None = None
    blocks: list[int] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)  # asked for, but the rank would save nothing

    def params_after(self) -> int:
        by_name = {layer.name: layer for layer in self.layers}
        return self.model_params - sum(by_name[n].dense - by_name[n].factored(r) for n, r in self.ranks.items())

    def summary(self) -> dict:
        by_name = {layer.name: layer for layer in self.layers}
        lin_before = sum(layer.dense for layer in self.layers)
        saved = sum(by_name[n].dense - by_name[n].factored(r) for n, r in self.ranks.items())
        macs_before = sum(layer.d_in * layer.d_out for layer in self.layers)
        macs_after = macs_before - sum(by_name[n].d_in * by_name[n].d_out - r * (by_name[n].d_in + by_name[n].d_out)
                                       for n, r in self.ranks.items())
        return {"params_before": self.model_params, "params_after": self.model_params - saved,
                "fraction_kept": (self.model_params - saved) / self.model_params,
                "block_linear_params_before": lin_before, "block_linear_params_after": lin_before - saved,
                "block_linear_fraction_kept": (lin_before - saved) / lin_before if lin_before else 1.0,
                "block_linear_macs_per_token_before": macs_before, "block_linear_macs_per_token_after": macs_after,
                "layers_decomposed": len(self.ranks), "b": self.b, "blocks_decomposed": self.blocks,
                "kept_dense": self.kept_dense}


def ranks_at(layers: list[Layer], b: float, multiple: int = 1) -> dict[str, int]:
    """r = floor(b·κ) rounded down to a multiple of `multiple` (at least one multiple) for each layer where that
    rank saves parameters."""
    ranks = {}
    for layer in layers:
        r = max(multiple, math.floor(b * layer.kappa) // multiple * multiple)
        if layer.saves(r):
            ranks[layer.name] = r
    return ranks


def _saved(layers: list[Layer], ranks: dict[str, int]) -> int:
    return sum(layer.dense - layer.factored(ranks[layer.name]) for layer in layers if layer.name in ranks)


def plan_keep(layers: list[Layer], targets: list[Layer], model_params: int, keep: float,
              schedule: str = "tail", multiple: int = 1) -> RankPlan:
    """Ranks that keep `keep` of the whole model's parameters: uniform b over the last N target blocks
    (schedule "tail", N from the paper's presets) or over every block ("uniform"); every rank a multiple of
    `multiple`."""
    if not 0 < keep <= 1:
        raise S2DError(f"keep must be a fraction in (0, 1] (got {keep})")
    target = math.floor(keep * model_params)
    if target >= model_params or not targets:
        return RankPlan({}, layers, model_params)
    blocks = sorted({t.block for t in targets})
    share = (model_params - target) / sum(t.dense for t in targets)
    n = len(blocks) if schedule == "uniform" else round(len(blocks) * (PRESET_INTERCEPT + PRESET_SLOPE * share))
    for n_blocks in range(min(max(n, 1), len(blocks)), len(blocks) + 1):
        chosen = [t for t in targets if t.block in blocks[-n_blocks:]]
        if model_params - _saved(chosen, ranks_at(chosen, 0.0, multiple)) <= target:
            break
    else:
        floor = model_params - _saved(targets, ranks_at(targets, 0.0, multiple))
        raise S2DError(f"keep={keep} is out of reach: rank {multiple} in every targeted Linear still leaves "
                       f"{floor / model_params:.1%} of the parameters; ask for a larger keep")
    lo, hi = 0.0, 1.0  # largest b whose count fits (the count only grows with b)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model_params - _saved(chosen, ranks_at(chosen, mid, multiple)) <= target else (lo, mid)
    ranks = ranks_at(chosen, lo, multiple)
    # floor(b·κ) moves whole groups of same-shape layers at once; hand out the rest one rank step at a time,
    # last block first, so the count lands within one rank step of the target.
    spare = target - (model_params - _saved(chosen, ranks))
    grew = True
    while grew:
        grew = False
        for t in sorted(chosen, key=lambda t: -t.block):
            r = ranks.get(t.name)
            if r is not None and t.saves(r + multiple) and multiple * (t.d_in + t.d_out) <= spare:
                ranks[t.name] = r + multiple
                spare -= multiple * (t.d_in + t.d_out)
                grew = True
    return RankPlan(ranks, layers, model_params, b=lo, blocks=blocks[-n_blocks:])


def plan_ranks(layers: list[Layer], targets: list[Layer], model_params: int, ranks: dict) -> RankPlan:
    """Explicit ranks by role, e.g. {"q": 64, "down": 128}; a rank that would save nothing keeps the layer dense."""
    roles = {t.role for t in targets}
    unknown = set(ranks) - roles
    if unknown:
        raise S2DError(f"ranks name roles {sorted(unknown)} that no targeted Linear has; roles here: {sorted(roles)}")
    out, dense = {}, []
    for t in targets:
        if t.role in ranks:
            r = check_rank(ranks[t.role], t.d_in, t.d_out, t.name)
            if t.saves(r):
                out[t.name] = r
            else:
                dense.append(t.name)
    if dense:
        log.warning("%d Linears kept dense: their rank would not save parameters (r ≥ κ)", len(dense))
    return RankPlan(out, layers, model_params, blocks=sorted({t.block for t in targets if t.name in out}),
                    kept_dense=dense)
