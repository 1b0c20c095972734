"""Low-rank compression: weight SVD, whitened SVD and feature-space ROM, on a budget or by surgical search."""

from s2d.lowrank.api import CompressionReport, compress, compress_folder
from s2d.lowrank.budget import RankPlan, plan_keep, plan_ranks
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.factorized import FactorizedLinear, break_even_rank
from s2d.lowrank.io import load, save

__all__ = [
    "CompressionReport", "FactorizedLinear", "LowRankConfig", "RankPlan", "break_even_rank", "compress",
    "compress_folder", "load", "plan_keep", "plan_ranks", "save",
]
