"""`diagnose(model, processor)`: calibration data, the collection pass, the link study and a severity summary."""

from __future__ import annotations

import torch

from s2d.arch import describe, model_inputs
from s2d.diagnose.collect import collect
from s2d.diagnose.config import DiagnoseConfig
from s2d.diagnose.link import link_study, reading
from s2d.errors import S2DError


def calibration_inputs(model, processor, config: DiagnoseConfig) -> list[dict]:
    """Seeded calibration batches: wiki windows for text models, test images for ViTs."""
    desc = describe(model)
    n, size = config.n_samples, config.batch_size
    if desc.kind == "vision":
        from s2d.assets import load_digits, load_fashion_mnist, pixel_values

        if config.data == "wiki":
            raise S2DError("a ViT needs images: pass --data fashion-mnist or --data digits")
        if config.data == "digits":
            images, _ = load_digits()
            images = images / 16.0
        else:
            images, _ = load_fashion_mnist("test", config.image_folder)
            images = images.float() / 255
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))[:n]
        pixels = pixel_values(images[order], int(model.config.image_size), int(getattr(model.config,
                                                                                        "num_channels", 1)))
        return [model_inputs(desc, {"pixel_values": pixels[i : i + size]}) for i in range(0, len(pixels), size)]
    if config.data != "wiki":
        raise S2DError(f"a text model needs text: --data {config.data} is for ViTs; use --data wiki")
    from s2d.assets import calibration_batch, wiki_text

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and config.seq_len > limit:
        raise S2DError(f"--seq-len {config.seq_len} exceeds this model's {limit} positions; pass --seq-len {limit} "
                       "or less")
    ids = calibration_batch(processor, wiki_text(config.split), n, config.seq_len, config.seed)
    return [model_inputs(desc, {"input_ids": ids[i : i + size], "attention_mask": torch.ones_like(ids[i : i + size])})
            for i in range(0, n, size)]


def severity(result: dict) -> dict:
    """The numbers `s2d compare` ranks models by."""
    sigmas = torch.tensor([lin["sigma1"] for lin in result["linears"]], dtype=torch.float64)
    q = torch.quantile(sigmas, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    residual_max = max(r["max_abs"] for r in result["residual"])
    linear_max = max(lin["output"]["max_abs"] for lin in result["linears"])
    kurt = [lin["output"]["kurtosis"] for lin in result["linears"]]
    return {
        "max_abs": max(residual_max, linear_max), "residual_max_abs": residual_max, "linear_max_abs": linear_max,
        "mean_kurtosis": sum(kurt) / len(kurt),
        "residual_mean_kurtosis": sum(r["kurtosis"] for r in result["residual"]) / len(result["residual"]),
        "massive_count": sum(r["massive_count"] for r in result["residual"]),
        "massive_linear_count": sum(lin["output"]["massive_count"] for lin in result["linears"]),
        "sigma1_p50": q[0], "sigma1_p90": q[1], "sigma1_p99": q[2], "sigma1_max": float(sigmas.max()),
    }


def diagnose(model, processor, config: DiagnoseConfig | None = None, progress: bool = True) -> dict:
    """Everything `s2d diagnose` reports, as one JSON-ready dict; the model is read, never changed."""
    config = (config or DiagnoseConfig()).validate()
    result = collect(model, calibration_inputs(model, processor, config), config, progress=progress)
    result["link"] = link_study(result["linears"])
    result["severity"] = severity(result)
    result["reading"] = reading(result)
    return result
