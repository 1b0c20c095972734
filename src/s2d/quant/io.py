"""Save a quantized model and rebuild it bit for bit.

The folder is a plain transformers model plus two additions:
- `model.safetensors` + `config.json`: what `from_pretrained` loads, with each quantized Linear's dequantized
  weight (any online rotation folded back), so plain transformers gets the weight-quantized model;
- `quantization.safetensors`: the integer weights, their scales and zero points, static activation scales
  and online rotations of every QuantLinear (and of the patch embedding's QuantConv2d, s2d.quant.conv), and the
  R3 rotations and softmax deltas of the attention layers (s2d.quant.kvcache) and the residual stream's scales
  (s2d.quant.residual);
- a `quantization` block in `config.json`: the QuantConfig and the list of quantized layers.
`s2d.load_model(folder)` loads the plain model, then `restore` swaps the QuantLinears back in from the
integer tensors (and re-attaches R3, KV-cache and softmax quantization, which run inside the attention and
cannot be expressed in the plain model), so outputs match the saved model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from s2d.errors import S2DError
from s2d.io import atomic_dir, nbytes
from s2d.quant.config import QuantConfig
from s2d.quant.conv import QuantConv2d, restore_patch_embed
from s2d.quant.kvcache import owned_names, restore_attention
from s2d.quant.linear import QuantLinear
from s2d.quant.residual import owned_names as residual_names
from s2d.quant.residual import restore_residual
from s2d.quant.rotate import Rotation
from s2d.quant.swap import set_module

QUANT_FILE = "quantization.safetensors"
FORMAT = "s2d-fake-quant"
FORMAT_VERSION = 4  # 2: each layer entry may carry its own w_bits/a_bits (mixed precision, layer_schemes)
# 3: a quantized patch embedding (patch_embed_bits) or softmax deltas (softmax_bits)
# 4: the residual stream's quantizers (residual_bits)


def save_quantized(model: nn.Module, folder: str | Path, tokenizer=None, config: QuantConfig | None = None) -> Path:
    """Write `model` (quantized by `s2d.quant.quantize`) to `folder` atomically; returns the folder."""
    config = config or getattr(model, "s2d_quant_config", None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if config is None or not layers:
        raise S2DError("this model has no s2d quantization to save: quantize it with s2d.quant.quantize first")
    from s2d.arch.finite import first_nonfinite_tensor

    if (bad := first_nonfinite_tensor(model)) is not None:
        raise S2DError(f"the quantized model's tensor {bad} holds NaN/Inf; it is not saved. Quantize again with more "
                       "bits, another observer or method, or check the original with `s2d diagnose`")
    quant_tensors, plain_state, entries = {}, {}, {}
    # R3's rotations, softmax deltas, residual scales: s2d's own tensors, not the plain model's
    attention = [*owned_names(model), *residual_names(model)]
    convs = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d)}
    for name, tensor in model.state_dict().items():
        owner = next((n for n in [*layers, *attention, *convs] if name.startswith(n + ".")), None)
        if owner is None:
            plain_state[name] = tensor
        else:
            quant_tensors[name] = tensor.contiguous()
    for name, layer in layers.items():
        plain_state[f"{name}.weight"] = layer.plain_weight()
        if layer.bias is not None:
            plain_state[f"{name}.bias"] = layer.bias
        rotation = layer.rotation
        entries[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                         "bias": layer.bias is not None,
                         "rotation": None if rotation is None else [f.shape[0] for f in rotation.factors],
                         "w_bits": None if layer.w_spec is None else layer.w_spec.bits,
                         "a_bits": None if layer.a_spec is None else layer.a_spec.bits}
    for name, conv in convs.items():  # plain transformers gets the dequantized filters
        plain_state[f"{name}.weight"] = conv.weight.clone()
        if conv.bias is not None:
            plain_state[f"{name}.bias"] = conv.bias
    # Version 1 readers rebuild every layer from the config's bits: a mixed folder must not look readable to them.
    mixed = any((e["w_bits"], e["a_bits"]) != (config.w_bits, config.a_bits) for e in entries.values())
    version = (FORMAT_VERSION if config.residual_bits is not None else
               3 if (config.softmax_bits, config.patch_embed_bits) != (None, None) else 2 if mixed else 1)
    block = {"format": FORMAT, "format_version": version, "config": config.to_dict(), "layers": entries}
    folder = Path(folder)
    with atomic_dir(folder, needed=nbytes(model.state_dict().values())) as tmp:
        model.save_pretrained(tmp, state_dict=plain_state)
        save_file(quant_tensors, str(tmp / QUANT_FILE), metadata={"format": FORMAT})
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization"] = block
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


@torch.no_grad()
def restore(model: nn.Module, folder: str | Path) -> nn.Module:
    """Swap the QuantLinears described in `folder`'s config.json back into `model` (loaded from that folder)."""
    folder = Path(folder)
    block = json.loads((folder / "config.json").read_text()).get("quantization")
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        raise S2DError(f"{folder}/config.json has no s2d quantization block; it is not an s2d-quantized model")
    if block.get("format_version", 0) > FORMAT_VERSION:
        raise S2DError(f"{folder} was saved by a newer s2d (quantization format {block['format_version']}); "
                       "upgrade s2d to load it")
    if not (folder / QUANT_FILE).is_file():
        raise S2DError(f"{folder} is missing {QUANT_FILE}, which holds the integer weights; copy the whole folder")
    config = QuantConfig.from_dict(block["config"])
    tensors = load_file(str(folder / QUANT_FILE))
    for name, entry in block["layers"].items():
        try:
            base = model.get_submodule(name)
        except AttributeError as err:
            raise S2DError(f"{folder} quantizes {name}, which this model does not have") from err
        rotation = None
        if entry.get("rotation"):
            rotation = Rotation.skeleton(entry["in_features"], entry["rotation"])
        # each layer's own bits; folders from before mixed precision have none: the config's
        w_spec = config.weight_spec_at(entry["w_bits"]) if "w_bits" in entry else config.weight_spec()
        a_spec = config.act_spec_at(entry["a_bits"]) if "a_bits" in entry else config.act_spec()
        layer = QuantLinear(entry["in_features"], entry["out_features"], entry["bias"], w_spec, a_spec,
                            config.a_static, rotation)
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = layer.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "act_clip"]  # folders from before per-layer clips: the config's
        if missing or unexpected:
            raise S2DError(f"{folder}/{QUANT_FILE} does not match layer {name}: missing {missing}, "
                           f"unexpected {unexpected}")
        set_module(model, name, layer.to(getattr(base, "weight", torch.empty(0)).device))
    restore_attention(model, config, tensors, f"{folder}/{QUANT_FILE}")
    restore_patch_embed(model, config, tensors, f"{folder}/{QUANT_FILE}")
    restore_residual(model, config, tensors, f"{folder}/{QUANT_FILE}")
    model.s2d_quant_config = config
    return model
