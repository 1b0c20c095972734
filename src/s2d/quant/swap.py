"""Module swapping, gpt-fast style: replace the Linears a filter selects, by walking the module tree."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def swap_linears(module: nn.Module, filter: Callable[[nn.Module, str], bool],
                 make: Callable[[nn.Linear, str], nn.Module], prefix: str = "") -> int:
    """Replace every nn.Linear under `module` for which filter(linear, qualified name) holds; returns the count."""
    count = 0
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Linear) and filter(child, full):
            setattr(module, name, make(child, full))
            count += 1
        else:
            count += swap_linears(child, filter, make, full)
    return count


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the qualified `name` in `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def leaf_filter(model: nn.Module, target: Callable[[nn.Module, str], bool]) -> Callable[[nn.Module, str], bool]:
    """`target`, extended to the nn.Linears inside any target that is not an nn.Linear itself.

    A low-rank layer (two Linears standing in for one) is a target under the original Linear's name; its
    weights are the Linears inside it, and each of them is quantized, inputs included.
    """
    composite = tuple(f"{name}." for name in composite_targets(model, target))

    def accepts(module: nn.Module, name: str) -> bool:
        return target(module, name) or (isinstance(module, nn.Linear) and name.startswith(composite))
    return accepts


def composite_targets(model: nn.Module, target: Callable[[nn.Module, str], bool]) -> list[str]:
    """Names of the targets that are not plain nn.Linears (weights-rewriting baselines cannot handle them)."""
    return [name for name, m in model.named_modules() if name and not isinstance(m, nn.Linear) and target(m, name)]
