"""Checkpoint tensor names ↔ the model's parameter names, by transformers' own conversion rules.

transformers renames modules between releases (ViT's `encoder.layer.N.attention.attention.query` is now
`layers.N.attention.q_proj`) but keeps checkpoints in the old names: from_pretrained renames each key on load
and save_pretrained renames back. Whatever reads or writes a folder tensor by tensor has to do the same.
"""

from __future__ import annotations

import torch
from torch import nn

from s2d.errors import S2DError


def _internals(*names: str) -> list:
    """transformers' renaming helpers by name. They are internals (5.x's core_model_loading and conversion_mapping,
    no public API does this); a release without them gets a clear error, not an AttributeError deep in a run."""
    import importlib

    import transformers

    found = []
    for name in names:
        module, attr = name.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(f"transformers.{module}"), attr))
        except (ImportError, AttributeError) as err:
            raise S2DError(f"this transformers ({transformers.__version__}) has no {name}, which s2d uses to read "
                           "and write folders tensor by tensor; install the release s2d is tested with "
                           "(pip install 'transformers>=5.24,<6'), or load the dense model (s2d.load_model) and "
                           "compress it in memory (python: s2d.lowrank.compress)") from err
    return found


def model_names(model: nn.Module, keys) -> dict[str, str]:
    """Model name → checkpoint name for each of the checkpoint's `keys`, renamed as from_pretrained renames them.

    A key that needs a tensor operation (a WeightConverter: split, merge, transpose) is refused: the renaming
    alone cannot hand that tensor to the model.
    """
    get_model_conversion_mapping, WeightConverter, WeightRenaming, dot_natural_key, rename_source_key = _internals(
        "conversion_mapping.get_model_conversion_mapping", "core_model_loading.WeightConverter",
        "core_model_loading.WeightRenaming", "core_model_loading.dot_natural_key",
        "core_model_loading.rename_source_key")

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    names: dict[str, str] = {}
    for key in sorted(keys, key=dot_natural_key):  # from_pretrained's order: some renamings depend on it
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if name not in expected and key in expected:  # already in the model's names (as from_pretrained checks)
            name, converted = key, None
        if converted is not None:
            raise S2DError(f"the checkpoint tensor {key} needs a weight conversion ({converted} → {name}), not only "
                           "a rename, and s2d reads folders tensor by tensor without such conversions; load the dense "
                           "model (s2d.load_model) and compress it in memory instead (python: s2d.lowrank.compress)")
        if name in names:
            raise S2DError(f"the checkpoint tensors {names[name]} and {key} both load into {name}; the folder holds "
                           "two copies of one weight: re-save it with save_pretrained")
        names[name] = key
    return names


def checkpoint_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (model names) under the names save_pretrained would write for this model, so that a folder
    written part by part holds what the in-memory save writes."""
    (revert_weight_conversion,) = _internals("core_model_loading.revert_weight_conversion")
    return revert_weight_conversion(model, state)
