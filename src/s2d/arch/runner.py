"""Run a model one block at a time on cached inputs, as GPTQ-style tools do."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from s2d.arch.describe import ModelDescription
from s2d.errors import S2DError


@dataclass
class BlockCall:
    """Everything block i is called with, except the hidden states: masks, rotary tables, position bias."""

    args: tuple
    kwargs: dict


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # the input of block 0 (the embeddings' output)
    calls: list[BlockCall]  # one per block


class _StopForward(Exception):
    pass


def model_inputs(desc: ModelDescription, batch: torch.Tensor | dict) -> dict:
    """Keyword inputs for a forward pass; causal LMs never build a KV cache here."""
    inputs = dict(batch) if isinstance(batch, dict) else {desc.family.main_input: batch}
    if desc.kind == "causal-lm":
        inputs.setdefault("use_cache", False)
    return inputs


@torch.no_grad()
def capture_block_inputs(desc: ModelDescription, batch: torch.Tensor | dict) -> BlockInputs:
    """Block 0's input and every block's call arguments, in one cheap pass.

    Block 0 runs for real so that its output type is known; blocks 1..n-2 pass their input through
    unchanged (masks and rotary tables do not depend on hidden values), and the pass stops at the last block.
    """
    blocks = [b.module for b in desc.blocks]
    if not blocks:
        raise S2DError("this model has no transformer blocks to run")
    calls: list[BlockCall | None] = [None] * len(blocks)
    first_input: list[torch.Tensor] = []
    out_is_tuple: list[bool] = []
    handles, originals = [], {}

    def pre_hook(i):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            calls[i] = BlockCall(tuple(args[1:]), kwargs)
            if i == 0:
                first_input.append(hidden)
            if i == len(blocks) - 1:
                raise _StopForward
        return hook

    def passthrough(hidden_states=None, *args, **kwargs):
        return (hidden_states,) if out_is_tuple[0] else hidden_states

    def learn_type(module, args, output):
        out_is_tuple.append(isinstance(output, tuple))

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            if 0 < i < len(blocks) - 1:
                originals[i] = block.forward
                block.forward = passthrough
        handles.append(blocks[0].register_forward_hook(learn_type))
        try:
            desc.model(**model_inputs(desc, batch))
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
        for i in originals:
            del blocks[i].forward  # drop the instance attribute; the class method is back
    if any(c is None for c in calls):
        raise S2DError("the forward pass did not reach every block; the model does not match its family layout")
    return BlockInputs(first_input[0], calls)


def run_block(desc: ModelDescription, index: int, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Block `index` applied to `hidden`, with the call arguments captured for that block."""
    out = desc.blocks[index].module(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_outputs(model: nn.Module, desc: ModelDescription, batch) -> list[torch.Tensor]:
    """The hidden state each block produces in a normal forward pass (a reference for tests and tools)."""
    outs: list[torch.Tensor] = []
    handles = [b.module.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for b in desc.blocks]
    try:
        model(**model_inputs(desc, batch))
    finally:
        for h in handles:
            h.remove()
    return outs
