"""`s2d export`: write a model as a GGUF file for llama.cpp, read it back through transformers, and say how close
it is to the source.

Any decoder `s2d.load_model` reads: a dense folder, a `.gguf`, a low-rank folder from `s2d compress` (its factors
are merged, W = B·A, which loses nothing) or a quantized one from `s2d quantize` (its dequantized weights, online
rotations folded back in, which is exact once nothing quantizes the activations). GGUF holds weights only: a
model that also quantizes activations or the KV cache is refused, unless `--weights-only` says to drop that.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from s2d.commands.load import load_model, source_of
from s2d.errors import S2DError
from s2d.export.gguf import ExportConfig, Written, gguf_architecture, write_gguf

FILE = "model.gguf"
# Largest relative error (‖read back − source‖ / ‖source‖) a tensor may show, by the type it was stored in: the
# rounding of that type, with room; a misnamed or mispermuted tensor is off by about 1.
TOLERANCE = {"F32": 1e-3, "F16": 3e-3, "Q8_0": 0.03, "Q4_0": 0.3}
# Config fields that say nothing about the function the model computes at inference (or that the tokenizer
# carries), and inputs of a field compared in their stead: `layer_types` is what `max_window_layers` (Qwen2) and
# `_sliding_window_pattern` (Gemma3) produce.
NOT_COMPARED = {"_name_or_path", "_model_name_or_path", "architectures", "transformers_version", "dtype",
                "torch_dtype", "id2label", "label2id", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
                "output_hidden_states", "output_attentions", "return_dict", "quantization_config", "problem_type",
                "initializer_range", "chunk_size_feed_forward", "is_encoder_decoder", "low_rank", "quantization",
                "attention_dropout", "pretraining_tp", "max_window_layers", "_sliding_window_pattern"}


def run_export(model_spec: str, config: ExportConfig, out: str | Path, trust_remote_code: bool = False,
               mode: str = "new", argv: list[str] | None = None) -> dict:
    """Write `model_spec` as `out`/model.gguf with metrics.json (types, the read-back check) and report.md."""
    from s2d.report.export import report_markdown
    from s2d.runs import RunFolder

    config.validate()
    with RunFolder(out, "export", {"model": str(model_spec), **config.to_dict()}, mode=mode, argv=argv) as run:
        model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
        source = source_of(model)
        arch = gguf_architecture(model)[1]["arch"]  # an encoder or a ViT fails here, before any work
        dense, conversion = dense_model(model, config.weights_only)
        del model
        check: dict = {}

        def read_back(path: Path, written: Written) -> None:
            check.update(check_gguf(dense, tokenizer, path, written, config.check_tokens))

        name = Path(str(model_spec)).name  # a run's model/ folder is named by its run
        name = Path(str(model_spec)).resolve().parent.name if name == "model" else name
        written = write_gguf(dense, tokenizer, run.path / FILE, config.type, name=name, check=read_back)
        if conversion["dequantized"] and config.type != "F16":
            written.notes.append(f"the weights were already quantized by s2d ({conversion.get('quantization')}); "
                                 f"{config.type} rounds them again on its own grid (blocks of 32), which adds error: "
                                 "F16 keeps s2d's values")
        metrics = {"model": str(model_spec), **source,
                   "gguf": {"file": FILE, "type": config.type, "architecture": arch,
                            "bytes": (run.path / FILE).stat().st_size, "tensor_types": written.tensor_types},
                   "conversion": conversion, "notes": written.notes + check.pop("notes", []), "check": check}
        run.write_metrics(metrics)
        run.write_text("report.md", report_markdown(metrics, run.command_line(f"export {model_spec}")))
    return metrics


def what_gguf_cannot_hold(model: nn.Module) -> list[str]:
    """What `model` computes beyond its weights: activation and KV-cache quantization, and the online rotations
    that only serve them."""
    from s2d.quant.linear import QuantLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    acts = [m for m in layers.values() if m.a_spec is not None]
    qconfig = getattr(model, "s2d_quant_config", None)
    lost = []
    if acts:
        bits = sorted({m.a_spec.bits for m in acts})
        static = " with static scales" if any(m.a_static for m in acts) else ""
        lost.append(f"activation quantization (A{'/'.join(map(str, bits))}{static}) on {len(acts)} Linears")
    if qconfig is not None and qconfig.kv_bits is not None:
        lost.append(f"KV-cache quantization ({qconfig.kv_bits} bits)")
    if lost:
        rotated = sum(m.rotation is not None for m in layers.values())
        if rotated:
            lost.append(f"the online rotations before {rotated} Linears")
        if qconfig is not None and qconfig.rotate_qk:
            lost.append("the online rotation of q and k (R3)")
    return lost


def dense_model(model: nn.Module, weights_only: bool = False) -> tuple[nn.Module, dict]:
    """A plain transformers copy of `model` holding only nn.Linear layers, and what the conversion did.

    Low-rank layers are merged (exact); quantized ones become their dequantized weights, any online rotation
    folded back (exact without activation quantization). What GGUF cannot hold is refused unless `weights_only`.
    """
    from s2d.lowrank.io import factorized_layers, merged_modules
    from s2d.quant.linear import QuantLinear

    lost = what_gguf_cannot_hold(model)
    if lost and not weights_only:
        raise S2DError(f"a GGUF file holds weights only, and this model also computes {'; '.join(lost)}. Pass "
                       "--weights-only to export its dequantized weights as a dense model (the file will not be "
                       "the quantized model: its activations and KV cache run in floating point)")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    conversion = {"merged_low_rank": 0, "dequantized": len(quantized), "dropped": lost}
    if not quantized and not factorized_layers(model):
        return model, conversion
    qconfig = getattr(model, "s2d_quant_config", None)
    if qconfig is not None:
        conversion["quantization"] = qconfig.label
    if not lost:  # exact: without activation quantization an online rotation is only a change of basis
        conversion["folded_rotations"] = sum(m.rotation is not None for m in quantized.values())
    with torch.no_grad():
        for name, layer in quantized.items():
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight.copy_(layer.plain_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
            model.set_submodule(name, linear)
        switches = {}
        if factorized_layers(model):
            replacements, switches = merged_modules(model)
            conversion["merged_low_rank"] = sum(n in factorized_layers(model) for n in replacements)
            for name, layer in replacements.items():
                model.set_submodule(name, layer)
    config = model.config.to_dict()
    for key in ("low_rank", "quantization"):
        config.pop(key, None)
    config.update(switches)
    config = type(model.config).from_dict(config)
    plain = type(model)(config).eval()
    state = model.state_dict()
    wanted = plain.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise S2DError(f"s2d cannot rebuild a dense model from this one (no {missing[0]}); export the folder "
                       "`s2d compress --merge` or `s2d quantize` wrote instead")
    plain.load_state_dict({k: state[k] for k in wanted})
    return plain, conversion


def check_gguf(source: nn.Module, tokenizer, path: Path, written: Written, tokens: int) -> dict:
    """Read the written file back with transformers' GGUF reader: its config must be the source's, each tensor
    within its type's rounding, and on `tokens` wiki tokens the perplexities of both are recorded."""
    from s2d.assets import gguf_file
    from s2d.assets.hf import pretrained_gguf, pretrained_gguf_config

    overrides = gguf_file.config_overrides(gguf_file.read_header(path))
    notes = [f"the file's biases set {', '.join(overrides)} from its tensors, as llama.cpp reads them; transformers' "
             f"GGUF reader drops them unless given {', '.join(f'{k}=True' for k in overrides)} (s2d passes it)"
             ] if overrides else []
    read_config = pretrained_gguf_config(path, **overrides)
    diffs = config_differences(source.config, read_config)
    if diffs:
        shown = "; ".join(f"{k}={a!r} (read back as {b!r})" for k, a, b in diffs[:3])
        raise S2DError(f"a GGUF file cannot carry this model's {shown}: the format has no key for it, so llama.cpp "
                       "and transformers' GGUF reader would build a different model. Nothing was written")
    if not tokens:
        return {"read_back": False, "notes": notes}
    model, gguf_tokenizer = pretrained_gguf(path, torch.float32, **overrides)
    errors = tensor_errors(source, model, written)
    bad = [(k, e, written.tensors[k][1]) for k, e in errors.items() if e > TOLERANCE[written.tensors[k][1]]]
    if bad:
        k, e, kind = bad[0]
        raise S2DError(f"the GGUF file does not read back as written: {k} ({kind}) is off by {e:.3g} relative, "
                       f"{len(bad)} tensor(s) in all. This is a bug in s2d's GGUF writer; nothing was written")
    result = {"read_back": True, "tensor_error_max": {kind: max(e for k, e in errors.items()
                                                               if written.tensors[k][1] == kind)
                                                      for kind in written.tensor_types}}
    result.update(compare_outputs(source, model, tokenizer, tokens))
    sample = _sample_text(2000)
    same = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"] == \
        gguf_tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
    result["tokenizer_matches"] = same
    if not same:
        notes.append("transformers' GGUF reader tokenizes wiki text differently from the source tokenizer (the "
                     "perplexities above use the source's token ids for both)")
    return {**result, "notes": notes}


def config_differences(source, read) -> list[tuple[str, object, object]]:
    """(field, source value, read-back value) for every config field that shapes the model's function."""
    a, b = source.to_dict(), read.to_dict()
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in NOT_COMPARED and not _same(a.get(k), b.get(k))]


def _same(x, y) -> bool:
    if isinstance(x, float) or isinstance(y, float):
        return isinstance(x, int | float) and isinstance(y, int | float) and abs(x - y) <= 1e-6 * max(abs(x), 1e-30)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple) and isinstance(y, list | tuple):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y, strict=True))
    return x == y


def tensor_errors(source: nn.Module, read: nn.Module, written: Written) -> dict[str, float]:
    """‖read − source‖ / ‖source‖ per written tensor (with a floor, so an all-zero norm gain compares absolutely)."""
    a, b = source.state_dict(), read.state_dict()
    out = {}
    for name in written.tensors:
        x, y = a[name].double(), b[name].double()
        out[name] = float((x - y).norm() / (x.norm() + 1e-4 * x.numel() ** 0.5))
    return out


@torch.no_grad()
def compare_outputs(source: nn.Module, model: nn.Module, tokenizer, tokens: int) -> dict:
    """Perplexity of both models on the same wiki token ids, and how far their logits are apart."""
    ids = tokenizer(_sample_text(8 * tokens), add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids[:tokens])
    width = min(256, source.config.max_position_embeddings, max(2, len(ids)))
    windows = ids[: len(ids) // width * width].reshape(-1, width)
    if not len(windows):
        raise S2DError(f"too little wiki text to check the export on {tokens} tokens; pass --check-tokens 0 to skip")
    nll = {"source": 0.0, "gguf": 0.0}
    max_diff, agree, count = 0.0, 0, 0
    for batch in windows.split(4):
        outs = {}
        for key, m in (("source", source), ("gguf", model)):
            logits = m(batch).logits.float()
            outs[key] = logits
            nll[key] += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                                batch[:, 1:].reshape(-1), reduction="sum"))
        max_diff = max(max_diff, float((outs["source"] - outs["gguf"]).abs().max()))
        agree += int((outs["source"].argmax(-1) == outs["gguf"].argmax(-1)).sum())
        count += batch.numel()
    scored = windows.shape[0] * (width - 1)
    ppl_source, ppl_gguf = (float(torch.tensor(nll[k] / scored).exp()) for k in ("source", "gguf"))
    return {"tokens": scored, "ppl_source": ppl_source, "ppl_gguf": ppl_gguf,
            "ppl_change": ppl_gguf / ppl_source - 1, "max_logit_diff": max_diff, "top1_agreement": agree / count}


def _sample_text(chars: int) -> str:
    from s2d.assets import wiki_text

    return wiki_text("test")[:chars]
