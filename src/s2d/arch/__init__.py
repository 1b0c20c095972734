"""Model adapters: the only module that knows families. Everything else asks `describe(model)`."""

from s2d.arch.describe import BlockRef, BranchRef, LinearRef, ModelDescription, describe, summary
from s2d.arch.families import FAMILIES, NORM_FEEDS, ROLES, Family, supported
from s2d.arch.fold import fold_norm_gains
from s2d.arch.runner import BlockCall, BlockInputs, block_outputs, capture_block_inputs, model_inputs, run_block

__all__ = [
    "FAMILIES", "NORM_FEEDS", "ROLES", "BlockCall", "BlockInputs", "BlockRef", "BranchRef", "Family", "LinearRef",
    "ModelDescription", "block_outputs", "capture_block_inputs", "describe", "fold_norm_gains", "model_inputs",
    "run_block", "summary", "supported",
]
