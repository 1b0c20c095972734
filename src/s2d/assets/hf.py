"""The one door to transformers' `from_pretrained`: custom code runs only with consent, pickles never load.

Every config, tokenizer, processor and model s2d reads from a folder comes through here, so that
`trust_remote_code` is always passed explicitly (transformers asks on stdin when it is left unset, and
answering "y" runs the folder's Python files), and so that a damaged folder ends in one S2DError.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from s2d.errors import S2DError

log = logging.getLogger(__name__)

FLAG = "--trust-remote-code"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def custom_code(folder: Path, files: tuple[str, ...] = _CODE_FILES) -> list[str]:
    """The `auto_map` entries of a folder's JSON files: classes it would import from its own .py files."""
    found = []
    for name in files:
        path = folder / name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
        except (ValueError, AttributeError, OSError):
            continue  # an unreadable file is reported by whichever loader reads it
        for key, value in auto_map.items():
            found.append(f"{name}: {key} → {value}")
    return found


def _needs_consent(folder: Path, what: str, err: Exception) -> S2DError:
    entries = custom_code(folder)
    listed = f" ({'; '.join(entries)})" if entries else ""
    return S2DError(f"{folder} needs its own Python code to load the {what}{listed}. s2d never runs a folder's code "
                    f"without consent: read that code, and pass {FLAG} only if you trust it")


def _remote_code_error(err: Exception) -> bool:
    return "trust_remote_code" in str(err) or "custom code" in str(err)


def _warn_ignored(folder: Path, what: str, trust_remote_code: bool, files: tuple[str, ...]) -> None:
    if not trust_remote_code and custom_code(folder, files):
        log.warning("%s: the folder ships custom code for its %s; s2d used transformers' built-in classes instead "
                    "(pass %s to run the folder's code)", folder, what, FLAG)


def pretrained_config(folder: Path, trust_remote_code: bool):
    """The folder's transformers config."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise S2DError(f"{folder} is not a model folder: it has no config.json. Point s2d at the folder that "
                       "holds config.json and the safetensors weights, or at a .gguf file")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises ValueError, KeyError, OSError or JSONDecodeError here
        if _remote_code_error(err):
            raise _needs_consent(folder, "config", err) from err
        raise S2DError(f"cannot read the config in {folder}: {err}. Check config.json (s2d supports "
                       f"Llama, Qwen2, Gemma3, BERT, MPNet and ViT; a custom architecture needs {FLAG})") from err
    _warn_ignored(folder, "config", trust_remote_code, ("config.json",))
    return config


def pretrained_tokenizer(folder: Path, trust_remote_code: bool, **kwargs):
    """The folder's tokenizer (or, for a vision model, its image processor); None if it has neither."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")) or kwargs:
        loader, what = AutoTokenizer, "tokenizer"
    elif (folder / "preprocessor_config.json").is_file():
        loader, what = AutoImageProcessor, "image processor"
    else:
        return None
    try:
        loaded = loader.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        if _remote_code_error(err):
            raise _needs_consent(folder, what, err) from err
        raise S2DError(f"cannot load the {what} in {folder}: {err}. Re-create the tokenizer files (for example "
                       "with the tokenizer's save_pretrained)") from err
    _warn_ignored(folder, what, trust_remote_code, _CODE_FILES[1:])
    return loaded


def check_weight_files(folder: Path) -> None:
    """Refuse a folder whose weights are pickles: unpickling an untrusted file can run any code."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise S2DError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); s2d loads safetensors only, because a "
            "pickle can run code when it is read. Convert once, in an environment you trust: python -c \"from "
            f"transformers import AutoModel; AutoModel.from_pretrained('{folder}').save_pretrained('{folder}-st')\" "
            "(save_pretrained writes model.safetensors), then point s2d at the new folder")
    raise S2DError(f"{folder} has no weights: expected model.safetensors (or a sharded model.safetensors.index.json)")


HEADS = {"sequence-classification": "AutoModelForSequenceClassification",
         "image-classification": "AutoModelForImageClassification"}


def model_class(config, head: str | None = None):
    """The transformers class for a folder's config: its own architecture, or an Auto class for a new head."""
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


def pretrained_model(model_class, folder: Path, trust_remote_code: bool, *, allow_missing: tuple[str, ...] = (),
                     **kwargs):
    """Load safetensors weights into `model_class`; a missing or unexpected tensor is an error, not random init.

    `allow_missing` names prefixes that may be absent, such as a classifier head that is created fresh.
    """
    check_weight_files(folder)
    try:
        model, info = model_class.from_pretrained(folder, trust_remote_code=trust_remote_code, use_safetensors=True,
                                                  output_loading_info=True, **kwargs)
    except S2DError:
        raise
    except Exception as err:  # SafetensorError, OSError, RuntimeError, ValueError: all mean a damaged folder
        if _remote_code_error(err):
            raise _needs_consent(folder, "model", err) from err
        raise S2DError(f"cannot load the weights in {folder}: {err}. The file may be truncated or corrupt: "
                       "re-create it (re-run the command that wrote it, or copy it again)") from err
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(allow_missing or ("\0",))]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = [k for k, *_ in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        parts = [f"{label} {_few(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", mismatched)) if keys]
        raise S2DError(f"the weights in {folder} do not match its config.json: {'; '.join(parts)}. A tensor left "
                       "out would be randomly initialized, so s2d refuses the folder: re-create it from a complete "
                       "checkpoint")
    return model


def pretrained_gguf(path: Path, dtype, **config):
    """(model, tokenizer) from a GGUF file through transformers' GGUF reader, every tensor dequantized; `config`
    overrides fields of the config the reader rebuilds from the file's metadata.

    A GGUF holds tensors and metadata, never code or pickles, so no remote code is asked for and nothing runs.
    A tensor the model needs and the file lacks is an error, as in `pretrained_model`, not a random init.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()  # an absolute gguf_file: transformers would otherwise look in the working folder
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=str(path), dtype=dtype,
                                                           trust_remote_code=False, output_loading_info=True,
                                                           **config)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=str(path), trust_remote_code=False)
    except S2DError:
        raise
    except Exception as err:  # ValueError, KeyError, OSError, struct.error: a file transformers cannot read
        raise S2DError(f"cannot load {path} with transformers' GGUF reader: {err}. The file may be truncated or "
                       "corrupt: copy or convert it again") from err
    missing = list(info.get("missing_keys", []))
    if missing:
        raise S2DError(f"{path} lacks tensors the model needs ({_few(missing)}); s2d does not fill them with random "
                       "values: convert the model again")
    return model, tokenizer


def pretrained_gguf_config(path: Path, **config):
    """The config transformers' GGUF reader rebuilds from `path`'s metadata (no tensors read, no code run)."""
    from transformers import AutoConfig

    path = Path(path).resolve()
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=str(path), trust_remote_code=False, **config)
    except Exception as err:
        raise S2DError(f"cannot read {path}'s metadata with transformers' GGUF reader: {err}") from err


def _few(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
