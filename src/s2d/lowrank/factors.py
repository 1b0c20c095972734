"""The rank-ordered factors of each Linear, by method, from statistics of its calibration inputs or outputs.

Shared by the budgeted compression (s2d.lowrank.api) and the surgical search (s2d.lowrank.search).
"""

from __future__ import annotations

from torch import nn
from tqdm.auto import tqdm

from s2d.arch import ModelDescription
from s2d.lowrank.asvd import asvd_factors
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.factorized import Factors
from s2d.lowrank.rom import rom_factors
from s2d.lowrank.runner import BlockRunner
from s2d.lowrank.svd import svd_factors

STATS = {"svd": None, "asvd": "input", "rom": "output"}  # what each method calibrates on


def factors_for(method: str, module: nn.Module, stats, config: LowRankConfig, max_rank: int,
                name: str = "this Linear") -> Factors:
    """The rank-ordered factors of one dense Linear (called `name` in messages) by `method`, cut to `max_rank`."""
    if method == "svd":
        return svd_factors(module.weight, module.bias, max_rank, name)
    if method == "asvd":
        return asvd_factors(module.weight, module.bias, stats, config.damp, max_rank, name)
    return rom_factors(module.weight, module.bias, stats, max_rank, name)


def collect_factors(desc: ModelDescription, max_ranks: dict[str, int], config: LowRankConfig, batch,
                    progress: bool = True) -> dict[str, Factors]:
    """Factors of the named Linears, every statistic taken on the dense model (non-sequential)."""
    kind, model = STATS[config.method], desc.model
    by_block: dict[int, list[str]] = {}
    for lin in desc.linears():
        if lin.name in max_ranks:
            by_block.setdefault(lin.block, []).append(lin.name)
    runner = BlockRunner(desc, batch, config.chunk_size) if kind else None
    out = {}
    last = max(by_block, default=-1)
    for i in tqdm(range(last + 1), desc="factors", unit="block", disable=not progress):
        names = by_block.get(i, [])
        stats = runner.collect(i, runner.groups(i, names), kind) if kind and names else {}
        for n in names:
            out[n] = factors_for(config.method, model.get_submodule(n), stats.get(n), config, max_ranks[n], n)
        if runner is not None and i < last:
            runner.advance(i)
    return out
