"""Turn any supported model into one plain description: blocks, role-tagged Linears, norms, head."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from s2d.arch.families import BRANCH_NORM_TAGS, BRANCH_WRITERS, Family, family_for, supported
from s2d.errors import S2DError


@dataclass(frozen=True)
class LinearRef:
    """One targeted Linear: its qualified name, role, block index and the module itself."""

    name: str
    role: str
    block: int
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), as the weight is stored."""
        return (self.module.out_features, self.module.in_features)


@dataclass(frozen=True)
class BranchRef:
    """One residual branch of a block: the Linear that ends it and the module whose output is added to the
    residual stream, which is its post-norm where the family has one (Gemma3), else the Linear itself."""

    kind: str  # "attn" or "mlp"
    writer: LinearRef
    norm: str | None  # qualified name of the post-norm between the writer and the residual add, if any
    module: nn.Module  # the module whose output the residual receives

    @property
    def output(self) -> str:
        """Qualified name of the module whose output is added to the residual stream."""
        return self.norm or self.writer.name


@dataclass(frozen=True)
class BlockRef:
    index: int
    name: str
    module: nn.Module
    linears: tuple[LinearRef, ...]
    norms: dict[str, str]  # qualified name -> what it normalizes (attn_in, mlp_in, ...)
    attention: str | None = None  # qualified name of the attention module (decoders: q, k, v after RoPE)
    branches: tuple[BranchRef, ...] = ()  # what each branch adds to the residual stream, in forward order
    probs: str | None = None  # qualified name of the module that computes the attention probabilities


@dataclass(frozen=True)
class ModelDescription:
    family: Family
    model: nn.Module
    blocks: tuple[BlockRef, ...]
    embeddings: str
    final_norm: str | None
    head: str | None
    patch_embed: str | None = None  # qualified name of the vision patch embedding's Conv2d

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def head_dim(self) -> int:
        """Channels per attention head: the config's head_dim where it sets one (Gemma3: 256 at d=640 in some
        sizes), else hidden_size / num_attention_heads."""
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else \
            self.model.config
        explicit = getattr(config, "head_dim", None)
        return int(explicit) if explicit else config.hidden_size // config.num_attention_heads

    def linears(self, roles: tuple[str, ...] | None = None) -> list[LinearRef]:
        return [lin for b in self.blocks for lin in b.linears if roles is None or lin.role in roles]

    def role_counts(self) -> dict[str, int]:
        return dict(Counter(lin.role for lin in self.linears()))

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def is_target(self, module: nn.Module, name: str) -> bool:
        """The default filter: every Linear in the blocks (embeddings and head excluded)."""
        return name in self._target_names

    @cached_property
    def _target_names(self) -> frozenset[str]:
        return frozenset(lin.name for lin in self.linears())


def _find(model: nn.Module, suffixes: str) -> str | None:
    """Qualified name of the shallowest module whose name is, or ends with, one of the "a|b" suffixes."""
    for suffix in filter(None, suffixes.split("|")):
        hits = [n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)]
        if hits:
            return min(hits, key=lambda n: n.count("."))
    return None


def _relative(block: nn.Module, paths: str) -> str | None:
    """The first of the "a|b" block-relative paths that exists in `block`."""
    for path in paths.split("|"):
        try:
            block.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def _branches(model: nn.Module, family: Family, linears: list[LinearRef], norms: dict[str, str]) -> tuple:
    out = []
    for kind, roles in BRANCH_WRITERS.items():
        writer = next((lin for lin in linears if lin.role in roles), None)
        if writer is None:
            continue
        tag = BRANCH_NORM_TAGS[kind]
        norm = next((n for n, what in norms.items() if what == tag), None) if tag in family.branch_norms else None
        out.append(BranchRef(kind, writer, norm, model.get_submodule(norm) if norm else writer.module))
    return tuple(out)


def describe(model: nn.Module) -> ModelDescription:
    """Describe a supported model; an unsupported one raises S2DError listing the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = family_for(model_type) if model_type else None
    if family is None:
        what = f"model type {model_type!r}" if model_type else f"{type(model).__name__} (no HF config)"
        raise S2DError(f"unsupported architecture: {what}. Supported families: {supported()}")
    blocks_name = _find(model, family.blocks)
    if blocks_name is None:
        raise S2DError(f"{type(model).__name__} has no '{family.blocks}' module list where {family.name} keeps its "
                       "blocks; is this a standard transformers model?")
    blocks = []
    for i, block in enumerate(model.get_submodule(blocks_name)):
        prefix = f"{blocks_name}.{i}"
        linears = []
        for paths, role in family.linears.items():
            path = _relative(block, paths)
            if path is None:
                raise S2DError(f"block {i} of this {family.name} model has no {paths}; the model does not match "
                               f"the {family.name} layout")
            linears.append(LinearRef(f"{prefix}.{path}", role, i, block.get_submodule(path)))
        norms = {f"{prefix}.{p}": what for ps, what in family.norms.items() if (p := _relative(block, ps))}
        attention = _relative(block, family.attention) if family.attention else None
        probs = _relative(block, family.probs) if family.probs else None
        blocks.append(BlockRef(i, prefix, block, tuple(linears), norms, attention and f"{prefix}.{attention}",
                               _branches(model, family, linears, norms), probs and f"{prefix}.{probs}"))
    head = next((h for h in (_find(model, s) for s in family.head) if h is not None), None)
    return ModelDescription(family, model, tuple(blocks), _find(model, family.embeddings) or "",
                            _find(model, family.final_norm), head,
                            _find(model, family.patch_embed) if family.patch_embed else None)


def summary(model: nn.Module) -> dict:
    """What `s2d info` prints: family, parameters, blocks, and the Linears grouped by role with shapes."""
    desc = describe(model)
    by_role: dict[str, dict] = {}
    for lin in desc.linears():
        entry = by_role.setdefault(lin.role, {"count": 0, "shapes": Counter(), "params": 0})
        entry["count"] += 1
        entry["shapes"][f"{lin.shape[0]}x{lin.shape[1]}"] += 1
        entry["params"] += lin.shape[0] * lin.shape[1]
    n_params = sum(p.numel() for p in model.parameters())
    linear_params = sum(e["params"] for e in by_role.values())
    return {
        "family": desc.family.name,
        "kind": desc.kind,
        "class": type(model).__name__,
        "parameters": n_params,
        "blocks": len(desc.blocks),
        "linears": len(desc.linears()),
        "block_linear_parameters": linear_params,
        "roles": {r: {"count": e["count"], "shapes": dict(e["shapes"]), "parameters": e["params"]}
                  for r, e in by_role.items()},
        "embeddings": desc.embeddings,
        "final_norm": desc.final_norm,
        "head": desc.head,
        "norms_per_block": sorted(set(desc.blocks[0].norms.values())) if desc.blocks else [],
    }
