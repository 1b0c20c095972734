"""Save a low-rank model as safetensors plus a `low_rank` block in config.json, and rebuild it from there.

The block lists every factorized Linear with its rank and whether B has a bias:
    "low_rank": {"format": "s2d.lowrank", "version": 1, "method": "rom",
                 "layers": {"model.layers.29.mlp.up_proj": {"rank": 130, "bias": true}, ...}}
`merge=True` writes an ordinary dense folder instead (W = B·A), which plain transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from s2d.errors import S2DError
from s2d.io import atomic_dir, atomic_write_json, nbytes
from s2d.lowrank.factorized import FactorizedLinear
from s2d.lowrank.names import model_names

FORMAT, VERSION = "s2d.lowrank", 1
INDEX = "model.safetensors.index.json"


def factorized_layers(model: nn.Module) -> dict[str, FactorizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def low_rank_block(model: nn.Module, method: str | None = None) -> dict:
    layers = {n: {"rank": m.rank, "bias": m.has_bias} for n, m in factorized_layers(model).items()}
    return {"format": FORMAT, "version": VERSION, "method": method, "layers": layers}


def _dense_linear(layer: nn.Module, with_bias: bool) -> nn.Linear:
    """A dense copy of a Linear or FactorizedLinear, with a (zero) bias added if `with_bias`."""
    dense = layer.to_dense() if isinstance(layer, FactorizedLinear) else layer
    if not with_bias or dense.bias is not None:
        return dense
    out = nn.Linear(dense.in_features, dense.out_features, bias=True, device=dense.weight.device,
                    dtype=dense.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(dense.weight)
        out.bias.zero_()
    return out


def merged_modules(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, bool]]:
    """Dense replacements for a merged export, and the config switches they need.

    rom's mean compensation gives a bias to Linears that had none; a plain transformers model can hold it
    only through a config switch that gives a whole set of Linears a bias (zero where there was none).
    """
    from s2d.arch import describe
    from s2d.arch.families import BIAS_SWITCHES

    desc = describe(model)
    factored = factorized_layers(model)
    plain = skeleton(model.config, type(model))  # which Linears a fresh model of this config gives a bias
    needs = {lin.role for lin in desc.linears() if lin.name in factored and factored[lin.name].has_bias
             and plain.get_submodule(lin.name).bias is None}
    switches = BIAS_SWITCHES.get(desc.family.name, {})
    uncovered = {r for r in needs if not any(r in roles for roles in switches.values())}
    if uncovered:
        raise S2DError(f"a merged {desc.family.name} model cannot hold the biases rom adds to {sorted(uncovered)} "
                       "(its config has no switch for them); save the low-rank folder instead, or use svd/asvd")
    on = {s: True for s, roles in switches.items() if needs & set(roles)}
    biased = {r for s in on for r in switches[s]}
    out = {lin.name: _dense_linear(model.get_submodule(lin.name), lin.role in biased) for lin in desc.linears()
           if lin.name in factored or lin.role in biased}
    return out, on


def save(model: nn.Module, folder: str | Path, tokenizer=None, method: str | None = None,
         merge: bool = False) -> Path:
    """Write the model (and tokenizer) to `folder` atomically: low-rank (safetensors + a `low_rank` block in
    config.json), or with `merge` an ordinary dense folder that plain transformers loads."""
    folder = Path(folder)
    swapped, switches = {}, {}
    if merge:  # swap dense layers in for the save only, then put the factors back
        replacements, switches = merged_modules(model)
        for name, layer in replacements.items():
            swapped[name] = model.get_submodule(name)
            model.set_submodule(name, layer)
    try:
        with atomic_dir(folder, needed=nbytes(model.state_dict().values())) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            config = json.loads((tmp / "config.json").read_text())
            config.pop("low_rank", None)
            config.update(switches)
            if not merge and factorized_layers(model):
                config["low_rank"] = low_rank_block(model, method)
            atomic_write_json(tmp / "config.json", config)
    finally:
        for name, layer in swapped.items():
            model.set_submodule(name, layer)
    return folder


def weight_map(folder: str | Path) -> dict[str, str]:
    """Tensor name → safetensors file, from the shard index or the single file; missing shards are an error."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            mapping = json.loads((folder / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise S2DError(f"{folder / INDEX} is not a valid shard index ({err}); re-save the model") from err
        missing = sorted({f for f in mapping.values() if not (folder / f).is_file()})
        if missing:
            raise S2DError(f"{folder} is missing weight shards {missing} listed in {INDEX}; copy the complete "
                           "model folder")
        return mapping
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as fh:
            return {k: "model.safetensors" for k in fh.keys()}
    raise S2DError(f"{folder} holds no safetensors weights (model.safetensors or {INDEX}); s2d reads safetensors "
                   "only, never pickles")


def read_tensors(folder: str | Path, keys: list[str], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Only the named tensors, one file open at a time (memory follows the tensors read, not the file)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(mapping[key], []).append(key)
    out = {}
    for name, file_keys in by_file.items():
        with safe_open(Path(folder) / name, "pt") as fh:
            for key in file_keys:
                out[key] = fh.get_tensor(key)
    return out


def tensor_shapes(folder: str | Path, mapping: dict[str, str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for name in sorted(set(mapping.values())):
        with safe_open(Path(folder) / name, "pt") as fh:
            for key in fh.keys():
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def skeleton(config, model_cls, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with its parameters on the meta device (no memory) and its buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_cls._from_config(config, dtype=dtype)
    return model.eval()  # from_config leaves dropout on


def tied_keys(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (tied embeddings); files leave them out."""
    model.tie_weights()
    first, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        first.add(id(p))
    return tied


def apply_block(model: nn.Module, block: dict) -> None:
    """Swap a FactorizedLinear (meta, empty) in for every Linear the `low_rank` block lists."""
    if not isinstance(block, dict) or block.get("format") != FORMAT or not isinstance(block.get("layers"), dict):
        raise S2DError(f"config.json's low_rank block is not an s2d.lowrank block: {str(block)[:200]}")
    if block.get("version", 0) > VERSION:
        raise S2DError(f"low_rank block version {block['version']} is newer than this s2d reads; upgrade s2d")
    for name, spec in block["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise S2DError(f"the low_rank block names {name}, which this model does not have") from err
        if not isinstance(old, nn.Linear):
            raise S2DError(f"the low_rank block names {name}, which is not a Linear")
        rank = spec.get("rank") if isinstance(spec, dict) else None
        if not isinstance(rank, int):
            raise S2DError(f"the low_rank block gives no integer rank for {name}: {spec!r}")
        layer = FactorizedLinear(old.in_features, old.out_features, rank, bias=bool(spec.get("bias")),
                                 device="meta", dtype=old.weight.dtype)
        model.set_submodule(name, layer)


def load(folder: str | Path, config, model_cls, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a low-rank model saved by `save`: a meta skeleton, the factorized Linears, then the weights."""
    folder = Path(folder)
    mapping = weight_map(folder)
    model = skeleton(config, model_cls, dtype)
    apply_block(model, config.low_rank)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = model_names(model, mapping)  # model name → the name save_pretrained wrote it under
    file_shapes = tensor_shapes(folder, mapping)
    shapes = {k: file_shapes[c] for k, c in names.items()}
    wrong = [f"{k}: file {shapes[k]}, model {expected[k]}" for k in shapes
             if k in expected and shapes[k] != expected[k]]
    if wrong:
        raise S2DError(f"the low_rank block in {folder / 'config.json'} does not match the weights: "
                       f"{'; '.join(wrong[:5])}")
    missing = set(expected) - set(shapes) - tied_keys(model)
    unexpected = set(shapes) - set(expected)
    if missing or unexpected:
        raise S2DError(f"the weights in {folder} do not match its low_rank block: missing {sorted(missing)[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")
    state = read_tensors(folder, list(names.values()), mapping)
    state = {k: state[c] for k, c in names.items()}
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise S2DError(f"{folder} left parameters unset: {still_meta[:5]}")
    return model.eval()
