"""The only place that knows model families: where each keeps its blocks, Linears, norms and head.

Modelled on SliceGPT's per-architecture adapters. Paths are relative to the block (for Linears and norms)
or are suffixes of qualified names in the model (for blocks, embeddings, final norm and head), so one entry
serves both the bare backbone (`LlamaModel`) and its task wrappers (`LlamaForCausalLM`). A path may list
alternatives as "a|b" where transformers versions name the same module differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")

# Which Linears a pre-norm feeds, by the norm's tag. The same in every pre-norm family; post-norms
# (attn_out, mlp_out) feed the residual stream, not a Linear, so they cannot be folded.
NORM_FEEDS = {"attn_in": ("q", "k", "v", "qkv"), "mlp_in": ("gate", "up", "fc1")}

# Linears whose output reaches another Linear's input linearly, channel by channel: in a gated MLP the down
# input is act(gate) * up, so scaling up's output channel j scales down's input channel j (SmoothQuant folds
# its 1/s there). fc1 -> fc2 passes a nonlinearity and cannot carry a scale.
LINEAR_FEEDS = {"up": ("down",)}

# Linears that write the residual stream (a residual rotation turns their outputs), and Linears that read a
# block-internal hidden state rather than the residual (QuaRot rotates their input online).
RESIDUAL_WRITERS = ("o", "down", "fc2")
MLP_HIDDEN_READERS = ("down", "fc2")

# A block's two residual branches, the roles of the Linear that ends each, and the tag of the norm that may sit
# between that Linear and the residual add (a family lists such norms in `branch_norms`).
BRANCH_WRITERS = {"attn": ("o",), "mlp": ("down", "fc2")}
BRANCH_NORM_TAGS = {"attn": "attn_out", "mlp": "mlp_out"}


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "causal-lm", "encoder" or "vision"
    model_types: tuple[str, ...]
    blocks: str
    linears: dict[str, str]  # block-relative path -> role
    norms: dict[str, str] = field(default_factory=dict)  # block-relative path -> what it normalizes
    embeddings: str = ""
    final_norm: str = ""
    head: tuple[str, ...] = ()
    main_input: str = "input_ids"
    pre_norm: bool = True
    norm_gain_offset: float = 0.0  # the norm scales by (offset + weight): Gemma's RMSNorm uses 1 + weight
    # Why an orthogonal rotation of the residual stream (QuaRot) would change this family's function; empty if
    # it does not: every norm is a pre-RMSNorm whose gain folds into the Linears it feeds.
    rotation_blocker: str = ""
    # Block-relative path of the attention module that hands q, k, v (after RoPE) to transformers'
    # AttentionInterface, where KV-cache quantization and QuaRot's R3 hook in; empty: no KV cache (encoders).
    attention: str = ""
    # Tags of the norms applied to a branch's output before it is added to the residual stream (Gemma's sandwich
    # post-norms), so what the branch adds is the norm's output. Empty: each branch adds its Linear's output (a
    # BERT-style post-LayerNorm normalizes the sum after the add, so it is not one of these).
    branch_norms: tuple[str, ...] = ()
    # Block-relative path of the module that turns attention scores into probabilities (softmax_bits quantizes them
    # there): one that hands q, k, v to AttentionInterface or, where `probs_dropout` is set, one that computes its
    # own softmax and passes the probabilities to that nn.Dropout submodule of it (MPNet calls no interface).
    probs: str = ""
    probs_dropout: str = ""
    # Suffix path of the vision patch embedding's Conv2d (patch_embed_bits); empty: no patch embedding.
    patch_embed: str = ""


_LLAMA_LINEARS = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
}
_LLAMA_NORMS = {"input_layernorm": "attn_in", "post_attention_layernorm": "mlp_in"}
_POST_LN = ("its post-LayerNorms sit inside the residual stream and subtract each token's mean, so their gains "
            "cannot be folded into Linears and a rotation of the residual stream does not commute with them")

FAMILIES: tuple[Family, ...] = (
    Family("llama", "causal-lm", ("llama",), "layers", _LLAMA_LINEARS, _LLAMA_NORMS,
           "embed_tokens", "norm", ("lm_head",), attention="self_attn", probs="self_attn"),
    Family("qwen2", "causal-lm", ("qwen2",), "layers", _LLAMA_LINEARS, _LLAMA_NORMS,
           "embed_tokens", "norm", ("lm_head",), attention="self_attn", probs="self_attn"),
    Family("gemma3", "causal-lm", ("gemma3_text",), "layers", _LLAMA_LINEARS,
           {"input_layernorm": "attn_in", "post_attention_layernorm": "attn_out",
            "pre_feedforward_layernorm": "mlp_in", "post_feedforward_layernorm": "mlp_out"},
           "embed_tokens", "norm", ("lm_head",), norm_gain_offset=1.0,
           rotation_blocker="its post-norms (post_attention_layernorm, post_feedforward_layernorm) rescale each "
           "branch's output channel by channel inside the residual stream, and its embeddings are scaled; a "
           "rotation of the residual stream does not commute with them", attention="self_attn",
           branch_norms=("attn_out", "mlp_out"), probs="self_attn"),
    Family("bert", "encoder", ("bert",), "encoder.layer",
           {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
            "attention.output.dense": "o", "intermediate.dense": "fc1", "output.dense": "fc2"},
           {"attention.output.LayerNorm": "attn_out", "output.LayerNorm": "mlp_out"},
           "embeddings", "", ("classifier",), pre_norm=False, rotation_blocker=_POST_LN, probs="attention.self"),
    Family("mpnet", "encoder", ("mpnet",), "encoder.layer",
           {"attention.attn.q": "q", "attention.attn.k": "k", "attention.attn.v": "v", "attention.attn.o": "o",
            "intermediate.dense": "fc1", "output.dense": "fc2"},
           {"attention.LayerNorm": "attn_out", "output.LayerNorm": "mlp_out"},
           "embeddings", "", ("classifier",), pre_norm=False, rotation_blocker=_POST_LN,
           probs="attention.attn", probs_dropout="dropout"),
    Family("vit", "vision", ("vit",), "layers|encoder.layer",
           {"attention.q_proj|attention.attention.query": "q", "attention.k_proj|attention.attention.key": "k",
            "attention.v_proj|attention.attention.value": "v", "attention.o_proj|attention.output.dense": "o",
            "mlp.fc1|intermediate.dense": "fc1", "mlp.fc2|output.dense": "fc2"},
           {"layernorm_before": "attn_in", "layernorm_after": "mlp_in"},
           "embeddings", "layernorm", ("classifier",), main_input="pixel_values",
           rotation_blocker="its LayerNorms subtract each token's mean, which does not commute with a rotation "
           "(that needs SliceGPT's LayerNorm-to-RMSNorm conversion, which s2d does not implement)",
           probs="attention.attention|attention", patch_embed="patch_embeddings.projection"),
)


def family_for(model_type: str) -> Family | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


# Config switches that give a family's Linears a bias, with the roles each switch covers. A merged low-rank
# export needs them when rom's mean compensation gives a bias to Linears that had none. Absent: no switch.
BIAS_SWITCHES = {
    "llama": {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")},
    "gemma3": {"attention_bias": ("q", "k", "v", "o")},
}

# The decoder families a GGUF file can hold (s2d reads and writes these): llama.cpp's architecture name; whether
# llama.cpp's converter permutes the q and k rows for its interleaved RoPE (its llama architecture does, and
# transformers' GGUF reader undoes it); and the roles whose biases llama.cpp's loader of that architecture reads.
# Absent: not exported, and a GGUF of it is not read.
GGUF_ARCHS = {
    "llama": {"arch": "llama", "permute_qk": True, "biases": ("q", "k", "v", "o", "gate", "up", "down")},
    "qwen2": {"arch": "qwen2", "permute_qk": False, "biases": ("q", "k", "v")},
    "gemma3": {"arch": "gemma3", "permute_qk": False, "biases": ()},
}
# llama.cpp's tensor name (`blk.N.<name>.weight`) of each Linear role of these families.
GGUF_TENSORS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
                "down": "ffn_down"}
