"""Write a dense decoder as a GGUF file, the way llama.cpp's converter (convert_hf_to_gguf.py) does.

For the three decoder families s2d supports (arch.families.GGUF_ARCHS), and no more:
- tensor names from the gguf package's name map (`blk.0.attn_q.weight`, ...); a tied head is not written, which
  is how a GGUF says the head is the embedding;
- the llama architecture's q and k rows permuted for llama.cpp's interleaved RoPE (transformers' GGUF reader
  undoes it on load);
- norm gains stored as offset + weight where the family's RMSNorm scales by 1 + weight (Gemma);
- 1-D tensors (norms, biases) in F32; matrices in F16, Q8_0 or Q4_0 through `gguf.quants`. Q4_0 keeps the
  embedding and the head in Q8_0, as llama.cpp's own Q4_0 mix keeps its output tensor in higher precision, and a
  matrix whose rows are not whole 32-value blocks stays F16 (llama.cpp's converter falls back the same way);
- the hyperparameters under `<arch>.*` and the tokenizer (vocabulary, merges, token types, special ids) under
  `tokenizer.ggml.*`.

The model must be a plain transformers model (nn.Linear layers): merging low-rank factors or dropping s2d's
quantization is the command layer's job (s2d.commands.export), which also reads the file back to check it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from s2d.config import Config
from s2d.errors import S2DError

TYPES = ("F16", "Q8_0", "Q4_0")
BLOCK = 32  # values per block of Q8_0 and Q4_0
F16_MAX = 65504.0


@dataclass
class ExportConfig(Config):
    """What `s2d export` writes, and how it checks what it wrote."""

    VERSION = 1
    HELP = {"type": "GGUF type of the weight matrices: F16, Q8_0 or Q4_0 (norms and biases stay F32)",
            "weights_only": "export only the (dequantized) weights of a quantized model as a dense one, dropping "
                            "what GGUF cannot hold: activation and KV-cache quantization",
            "check_tokens": "wiki test tokens the file, read back by transformers' GGUF reader, is scored on next "
                            "to the source (0: skip the read-back check)"}
    CHOICES = {"type": TYPES}
    type: str = "F16"
    weights_only: bool = False
    check_tokens: int = 1024

    def validate(self) -> ExportConfig:
        if self.type not in TYPES:
            raise S2DError(f"unknown GGUF type {self.type!r}; use one of {', '.join(TYPES)}")
        if self.check_tokens < 0:
            raise S2DError(f"--check-tokens must be 0 (no check) or more, got {self.check_tokens}")
        return self


@dataclass
class Written:
    """What `write_gguf` put in the file: per transformers tensor, its GGUF name and type."""

    path: Path
    architecture: str
    tensors: dict[str, tuple[str, str]] = field(default_factory=dict)  # hf name -> (gguf name, type)
    notes: list[str] = field(default_factory=list)

    @property
    def tensor_types(self) -> dict[str, int]:
        return dict(Counter(t for _, t in self.tensors.values()).most_common())


def gguf_architecture(model: nn.Module) -> tuple[str, dict]:
    """(s2d's family name, its entry in arch.families.GGUF_ARCHS) for the model; other families are refused."""
    from s2d.arch.families import GGUF_ARCHS, family_for

    family = family_for(getattr(model.config, "model_type", ""))
    if family is None or family.name not in GGUF_ARCHS:
        known = ", ".join(GGUF_ARCHS)
        what = family.name if family is not None else getattr(model.config, "model_type", type(model).__name__)
        raise S2DError(f"s2d exports GGUF for the {known} decoder families; this model is {what}")
    return family.name, GGUF_ARCHS[family.name]


def write_gguf(model: nn.Module, tokenizer, path: str | Path, qtype: str = "F16", name: str | None = None,
               check: Callable[[Path, Written], None] | None = None) -> Written:
    """Write `model` (a plain transformers decoder) and its tokenizer to the GGUF file `path`, atomically.

    `check(temporary_path, written)` runs on the finished file before it takes `path`'s name; if it raises, the
    file is removed and `path` is left as it was.
    """
    import gguf

    from s2d.arch.families import family_for
    from s2d.io import atomic_path

    if qtype not in TYPES:
        raise S2DError(f"unknown GGUF type {qtype!r}; use one of {', '.join(TYPES)}")
    if tokenizer is None:
        raise S2DError("a GGUF file carries its tokenizer, and this model has none: save the tokenizer with it")
    _, entry = gguf_architecture(model)
    family, arch = family_for(model.config.model_type), entry["arch"]
    config = model.config
    path = Path(path)
    written = Written(path, arch)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type("model")
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "s2d-export")).name)
    writer.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    if qtype != "F16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written.notes += _hyperparameters(writer, config, arch)
    written.notes += _tokenizer(writer, tokenizer, config.vocab_size)
    for hf_name, gguf_name, data in _tensors(model, entry, family.norm_gain_offset):
        kind = _kind(gguf_name, data, qtype)
        if kind == "F16" and np.abs(data).max(initial=0.0) > F16_MAX:
            kind = "F32"
            written.notes.append(f"{hf_name} exceeds the F16 range and is stored as F32")
        if kind == "F32":
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qt), raw_dtype=qt)
        written.tensors[hf_name] = (gguf_name, kind)
    with atomic_path(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if check is not None:
            check(tmp, written)
    return written


def _kind(gguf_name: str, data: np.ndarray, qtype: str) -> str:
    if data.ndim < 2:
        return "F32"
    if qtype == "Q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = "Q8_0"
    if qtype != "F16" and data.shape[-1] % BLOCK:
        return "F16"
    return qtype


def _hyperparameters(writer, config, arch: str) -> list[str]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    rope = rope.get("full_attention", rope)  # Gemma3: the global layers' rope; llama.cpp fixes the local one
    if rope.get("rope_type", "default") != "default":
        raise S2DError(f"the model's RoPE scaling ({rope['rope_type']}) is not exported: transformers' GGUF reader "
                       "does not read it back")
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise S2DError("Gemma3 in GGUF has no attention logit soft-capping; this model sets "
                           f"attn_logit_softcapping={config.attn_logit_softcapping}")
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            return [f"llama.cpp scales Gemma3's attention scores by 1/sqrt(head_dim) = 1/sqrt({head_dim}); this model "
                    f"by 1/sqrt(query_pre_attn_scalar) = 1/sqrt({scalar}), which GGUF has no key for (transformers' "
                    "reader assumes 256), so llama.cpp will compute a different model"]
    return []


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: each head's rotary halves interleaved, for its RoPE on adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: nn.Module, entry: dict, norm_offset: float):
    """(transformers name, GGUF name, float32 array) for every tensor llama.cpp reads."""
    import gguf

    from s2d.arch.families import GGUF_TENSORS

    arch, permute = entry["arch"], entry["permute_qk"]
    biased = {GGUF_TENSORS[role] for role in entry["biases"]}
    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a GGUF without output.weight ties the head to token_embd
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise S2DError(f"{hf_name} has no GGUF name in llama.cpp's {arch} architecture, so a GGUF file cannot "
                           "hold this model")
        if gguf_name.startswith("blk.") and gguf_name.endswith(".bias") and gguf_name.split(".")[2] not in biased:
            raise S2DError(f"llama.cpp's {arch} architecture has no bias for {gguf_name.split('.')[2]}, and this model "
                           f"has one ({hf_name}: rom's mean compensation adds such biases). Compress with --method "
                           "svd or asvd to export it as GGUF")
        data = tensor.detach().to("cpu", torch.float32)
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        if norm_offset and hf_name.endswith("norm.weight"):
            data = data + norm_offset
        yield hf_name, gguf_name, data.numpy()


# -- the tokenizer --------------------------------------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _tokenizer(writer, tokenizer, vocab_size: int) -> list[str]:
    """Write the vocabulary as llama.cpp reads it: "gpt2" (byte-level BPE) or "llama" (BPE with byte fallback,
    SentencePiece's layout). Returns notes on what llama.cpp or transformers will do differently."""
    if not getattr(tokenizer, "is_fast", False):
        raise S2DError("GGUF export needs a fast (tokenizer.json) tokenizer; this one is "
                       f"{type(tokenizer).__name__}")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise S2DError(f"s2d writes BPE vocabularies to GGUF; this tokenizer's model is {model.get('type')}")
    sentencepiece = bool(model.get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise S2DError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                       "embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            tokens.append(token)
            types.append(BYTE)
        else:
            tokens.append(token)
            types.append(UNKNOWN if i == tokenizer.unk_token_id else NORMAL)
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    notes = []
    if not sentencepiece:
        pre, note = _pre_tokenizer(spec.get("pre_tokenizer"))
        writer.add_tokenizer_pre(pre)
        notes += [note] if note else []
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(vocab_size)])  # merge priority where no merges are given
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m)
              for m in model.get("merges") or []]
    if merges:
        writer.add_token_merges(merges)
    elif not sentencepiece:
        notes.append("the vocabulary has no merges (every token is a byte or a special token); transformers reads "
                     "it back, but llama.cpp's BPE loader asks for a merge list")
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    extra = len(full) > len(plain)
    writer.add_add_bos_token(extra and tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(extra and tokenizer.eos_token_id is not None and full[-1] == tokenizer.eos_token_id)
    if sentencepiece:
        writer.add_add_space_prefix("▁" in json.dumps(spec.get("normalizer")) + json.dumps(spec.get("pre_tokenizer")))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    return notes


def _pre_tokenizer(pre: dict | None) -> tuple[str, str | None]:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, and a note when it has none."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and "pattern" in p]
    kinds = [p.get("type") for p in parts]
    if splits:
        names = {regex: name for name, regex in reversed(GGUF_PRE_TOKENIZER_SPLITS.items())}
        if len(splits) == 1 and splits[0] in names:
            return names[splits[0]], None
    elif kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", None
    elif kinds == ["ByteLevel"]:
        return "default", None  # no split at all: byte-level BPE over the whole text
    elif kinds == ["Digits", "ByteLevel"]:
        return "smollm", ("the pre-tokenizer splits digits one by one (llama.cpp's 'smollm'); transformers' GGUF "
                          "reader does not, so it may tokenize numbers differently from the source")
    return "default", ("the tokenizer's pre-tokenizer has no llama.cpp name; the file says 'default', so llama.cpp "
                       "and transformers' GGUF reader may split text differently from the source")

