"""Where a model's numbers stop being finite: the first NaN/Inf weight, or the first module whose output is."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from s2d.errors import S2DError


def first_nonfinite_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or Inf, or None."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_tensors(named: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor (a cheap pass, done at every load)."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise S2DError(f"{source}: tensor {name} holds {bad:,} NaN/Inf value(s) of {tensor.numel():,}; the file "
                           "is damaged or the run that wrote it diverged. Re-create it (for a fine-tune, resume from "
                           "an earlier checkpoint or lower the learning rate)")


def _tensors(output) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):  # transformers' ModelOutput is a dict
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, tuple | list):
        for value in output:
            yield from _tensors(value)


@torch.no_grad()
def scan_outputs(model: nn.Module, inputs: dict) -> tuple[str | None, tuple[float, str]]:
    """Run `model(**inputs)` with a hook on every module: the first (in execution order) whose output is not
    finite ("" for the model itself, None if none), and the largest |output| with its module."""
    bad: list[str] = []
    largest = [(0.0, "")]

    def hook(name):
        def check(module, args, output):
            for t in _tensors(output):
                if bad or not t.is_floating_point() or not t.numel():
                    continue
                if not torch.isfinite(t).all():
                    bad.append(name)
                elif name and (peak := float(t.abs().max())) > largest[0][0]:
                    largest[0] = (peak, name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return (bad[0] if bad else None), largest[0]


def describe_nonfinite(model: nn.Module, inputs: dict) -> str:
    """A phrase for an error message: which weight or module first holds or produces NaN/Inf."""
    tensor = first_nonfinite_tensor(model)
    if tensor is not None:
        return f"the weight {tensor} holds NaN/Inf"
    try:
        module, _ = scan_outputs(model, inputs)
    except Exception as err:  # noqa: BLE001 - the probe is best effort; the error it explains is already raised
        return f"a probe forward to find the layer failed too ({type(err).__name__})"
    if module:
        return f"the output of {module} is the first to hold NaN/Inf (its weights are finite: an overflow)"
    return "no module's output is NaN/Inf on a probe input, so the score itself overflowed"
