"""Seeded random `from_config` models of each supported family, small enough for millisecond forwards."""

from __future__ import annotations

import torch

from s2d.errors import S2DError

TINY_SEED = 0
TINY_VOCAB = 256 + 3  # every byte, plus <bos>, <eos>, <pad>
TINY_POSITIONS = 512


def _configs():
    from transformers import BertConfig, Gemma3TextConfig, LlamaConfig, MPNetConfig, Qwen2Config, ViTConfig

    decoder = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_POSITIONS,
                   bos_token_id=256, eos_token_id=257, pad_token_id=258)
    encoder = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=TINY_POSITIONS, pad_token_id=258)
    return {
        "llama": ("LlamaForCausalLM", LlamaConfig(**decoder, tie_word_embeddings=True)),
        "qwen2": ("Qwen2ForCausalLM", Qwen2Config(**decoder, tie_word_embeddings=False)),
        # Gemma3 alternates sliding and full attention, which exercises per-block masks and rotary tables.
        "gemma3": ("Gemma3ForCausalLM", Gemma3TextConfig(**decoder, head_dim=16, sliding_window=16,
                                                         layer_types=["sliding_attention", "full_attention",
                                                                      "sliding_attention"])),
        "bert": ("BertForSequenceClassification", BertConfig(**encoder, num_labels=2)),
        "mpnet": ("MPNetForSequenceClassification", MPNetConfig(**encoder, num_labels=2)),
        "vit": ("ViTForImageClassification", ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                       num_attention_heads=4, image_size=28, patch_size=7,
                                                       num_channels=1, num_labels=10)),
    }


TINY_FAMILIES = ("llama", "qwen2", "gemma3", "bert", "mpnet", "vit")


def _scratch_configs():
    from transformers import ViTConfig

    # A small ViT for pre-training on Fashion-MNIST here: 16 patches of 7x7, d=128, 6 blocks (~1.2M parameters).
    # vit-fmnist-deep doubles the depth (12 blocks, ~2.4M): outliers grow with depth (bench/exp_vit_static.py).
    # vit-fmnist-wide also doubles the width (d=256, ~9.5M): a LayerNorm's output is capped at sqrt(d-1) times its
    # gain, so at d=128 no residual outlier reaches a Linear larger than ~11x gain; width lifts that cap.
    shape = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, image_size=28, patch_size=7,
                 num_channels=1, num_labels=10)
    return {"vit-fmnist": ("ViTForImageClassification", ViTConfig(**shape, num_hidden_layers=6)),
            "vit-fmnist-deep": ("ViTForImageClassification", ViTConfig(**shape, num_hidden_layers=12)),
            "vit-fmnist-wide": ("ViTForImageClassification", ViTConfig(**{**shape, "hidden_size": 256,
                                                                           "intermediate_size": 1024},
                                                                        num_hidden_layers=12))}


SCRATCH_MODELS = ("vit-fmnist", "vit-fmnist-deep", "vit-fmnist-wide")


def scratch_model(name: str, *, dtype: torch.dtype = torch.float32, seed: int = TINY_SEED):
    """A randomly initialized model meant for pre-training here (no tokenizer for vision models)."""
    import transformers

    configs = _scratch_configs()
    if name not in configs:
        raise S2DError(f"unknown scratch model {name!r}; choose one of {', '.join(SCRATCH_MODELS)}")
    cls_name, config = configs[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(config).to(dtype).eval()
    return model, None


def tiny_model(family: str, *, dtype: torch.dtype = torch.float32, seed: int = TINY_SEED):
    """Return a seeded random model of `family` and a byte-level tokenizer (None for vit)."""
    import transformers

    configs = _configs()
    if family not in configs:
        raise S2DError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    cls_name, config = configs[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(config).to(dtype).eval()
    tokenizer = None if family == "vit" else byte_tokenizer()
    return model, tokenizer


def byte_tokenizer(add_bos: bool = False):
    """A 259-token byte-level tokenizer, so tiny models run on real text with no vocabulary file.

    `add_bos=True` makes `tokenizer(text)` prepend <bos>, as Gemma's tokenizers do (`add_bos_token`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", model_max_length=TINY_POSITIONS, add_bos_token=add_bos)
