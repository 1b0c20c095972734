"""Model adapters: the only module that knows families. Everything else asks `describe(model)`."""

from s2d.arch.describe import BlockRef, LinearRef, ModelDescription, describe, summary
from s2d.arch.families import FAMILIES, ROLES, Family, supported
from s2d.arch.runner import BlockCall, BlockInputs, block_outputs, capture_block_inputs, model_inputs, run_block

__all__ = [
    "FAMILIES", "ROLES", "BlockCall", "BlockInputs", "BlockRef", "Family", "LinearRef", "ModelDescription",
    "block_outputs", "capture_block_inputs", "describe", "model_inputs", "run_block", "summary", "supported",
]
