"""KV-cache quantization and R3 (s2d.quant.kvcache): a naive reference, function preservation, save and reload."""

import copy
import json

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from s2d.arch import describe
from s2d.assets.tiny import tiny_model
from s2d.errors import S2DError
from s2d.quant import QuantConfig, prepare, quantize
from s2d.quant.kvcache import AttentionQuant, kv_spec


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _tokens(seq=24):
    return torch.randint(0, 200, (2, seq), generator=torch.Generator().manual_seed(0))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# -- a reference written by hand: min-max over each (batch, head, token) vector, then attention by hand ----------


def _naive_kv(x, bits, clip):
    """Asymmetric min-max fake quantization of every head_dim vector, one (batch, head, token) at a time. The range
    is widened to hold 0 (so 0 is exact), as torch.ao does; post-RoPE vectors straddle 0 anyway."""
    out = torch.empty_like(x)
    top = 2**bits - 1
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            for t in range(x.shape[2]):
                v = x[b, h, t]
                lo, hi = torch.clamp(v.min() * clip, max=0), torch.clamp(v.max() * clip, min=0)
                scale = (hi - lo) / top
                zero = torch.round(-lo / scale)
                code = torch.clamp(torch.round(v / scale) + zero, 0, top)
                out[b, h, t] = (code - zero) * scale
    return out


def _naive_attention(bits, clip):
    """Causal attention written out (GQA by repeating KV heads), with K and V rounded by `_naive_kv`."""
    def attend(module, q, k, v, attention_mask, scaling, **kwargs):
        k, v = _naive_kv(k, bits, clip), _naive_kv(v, bits, clip)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = q @ k.transpose(-1, -2) * scaling
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).contiguous(), probs
    return attend


@pytest.mark.parametrize("family,bits,clip", [("llama", 4, 1.0), ("qwen2", 4, 0.8), ("llama", 8, 0.9)])
def test_kv_quantization_matches_a_naive_reference(family, bits, clip):
    x = _tokens()
    reference, _ = tiny_model(family)
    name = f"s2d_test_naive_kv{bits}_{clip}"
    AttentionInterface.register(name, _naive_attention(bits, clip))  # no mask function: the reference masks itself
    reference.set_attn_implementation(name)
    expected = _logits(reference, x)
    model, _ = tiny_model(family)
    fp = _logits(model, x)
    quantize(model, QuantConfig.from_scheme(f"W16A16KV{bits}", kv_clip=clip), progress=False)
    got = _logits(model, x)
    assert _rel(got, expected) < 1e-5
    assert _rel(got, fp) > 1e-3  # the rounding is visible, so the match above means something
    # decoding the last token from the cache (transformers caches FP k, v; the whole cache is rounded at each step)
    # matches the reference's rounding of each token once: per-token codes depend on the token alone
    with torch.no_grad():
        past = model(input_ids=x[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=x[:, -1:], cache=past).logits[:, -1]
    assert _rel(step, expected[:, -1]) < 1e-5


def test_one_scale_and_zero_point_per_batch_head_and_token():
    """The spec on a (batch, heads, seq, head_dim) tensor: K and V rounded per vector, q left alone."""
    q, k, v = torch.randn(3, 2, 3, 5, 16, generator=torch.Generator().manual_seed(1)).unbind(0)
    k[0, 1, 2, 7] = 40.0  # an outlier rounds its own vector coarsely, and no other
    spec = kv_spec(QuantConfig.from_scheme("W16A16KV4", kv_clip=0.9))
    q2, k2, v2 = AttentionQuant(spec=spec)(q, k, v)
    assert torch.equal(q2, q)
    assert torch.allclose(k2, _naive_kv(k, 4, 0.9), atol=1e-6) and torch.allclose(v2, _naive_kv(v, 4, 0.9), atol=1e-6)


# -- R3 ------------------------------------------------------------------------------------------------------------


def _llama_six_heads():
    config = LlamaConfig(vocab_size=259, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=16, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family,rotate", [("llama", True), ("qwen2", True), ("gemma3", False), ("six-heads", True)])
def test_r3_preserves_the_function_and_changes_what_is_rounded(family, rotate):
    """qwen2: GQA with biases; gemma3: q/k norms and sliding windows, and no R1; six-heads: 6 query, 3 KV heads."""
    base = _llama_six_heads() if family == "six-heads" else tiny_model(family)[0]
    x = _tokens()
    ref = _logits(base, x)
    config = QuantConfig(w_bits=None, a_bits=None, rotate=rotate, rotate_qk=True)
    r3 = prepare(copy.deepcopy(base), config)
    assert _rel(_logits(r3, x), ref) < 1e-4
    # R3 runs before the KV rounding: KV4 on the R3 model rounds other numbers than KV4 without it
    without = prepare(copy.deepcopy(base), QuantConfig(w_bits=None, a_bits=None, rotate=rotate))
    kv4 = QuantConfig(w_bits=None, a_bits=None, kv_bits=4)
    r3_kv4, kv4_only = (_logits(quantize(m, kv4, progress=False), x) for m in (r3, without))
    assert _rel(r3_kv4, kv4_only) > 1e-3


def test_kv4_changes_the_output_and_kv8_less():
    base, _ = tiny_model("llama")
    x = _tokens()
    fp = _logits(base, x)
    err = {b: _rel(_logits(quantize(copy.deepcopy(base), QuantConfig.from_scheme(f"W16A16KV{b}"), progress=False), x),
                   fp) for b in (4, 8)}
    assert err[4] > 1e-2 and 0 < err[8] < err[4] / 4


def _score_errors(model, x):
    """Per layer, the relative error of the attention scores q kᵀ (before scaling) that K's rounding causes; R3 keeps
    exact scores, so both models are measured against the same thing. (In the logits of a random tiny model V's
    rounding, which R3 does not touch, would hide K's.)"""
    errors = []

    def hook(module, inputs, outputs):
        (q, k, _), (q2, k2, _) = inputs, outputs
        groups = q.shape[1] // k.shape[1]
        exact = q @ k.repeat_interleave(groups, 1).transpose(-1, -2)
        errors.append(_rel(q2 @ k2.repeat_interleave(groups, 1).transpose(-1, -2), exact))

    desc = describe(model)
    handles = [desc.module(b.attention).s2d_kv.register_forward_hook(hook) for b in desc.blocks]
    _logits(model, x)
    for h in handles:
        h.remove()
    return errors


def test_r3_lowers_the_kv4_error_of_a_key_outlier_channel():
    model, _ = tiny_model("llama")
    desc = describe(model)
    with torch.no_grad():  # channel 3 of every KV head 30x larger (RoPE shares it with channel 11)
        for k in desc.linears(("k",)):
            k.module.weight[3::desc.head_dim] *= 30
    x = _tokens()
    plain = _score_errors(quantize(copy.deepcopy(model), QuantConfig.from_scheme("W16A16KV4"), progress=False), x)
    r3 = _score_errors(quantize(model, QuantConfig.from_scheme("W16A16KV4", rotate_qk=True), progress=False), x)
    assert len(plain) == len(r3) == 3
    assert all(a < 0.85 * b for a, b in zip(r3, plain, strict=True)), (r3, plain)


# -- save, reload, bad input, CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_w4a4kv4_with_r3_reloads_identically(family, tmp_path):
    from safetensors import safe_open

    from s2d import load_model
    from s2d.quant import save_quantized

    model, tok = load_model(f"tiny:{family}")
    config = QuantConfig.from_scheme("W4A4KV4", rotate=True, rotate_qk=True)
    quantize(model, config, progress=False)  # calib=None: R3 and KV rounding need no calibration
    x = _tokens()
    before = _logits(model, x)
    save_quantized(model, tmp_path / "q", tok, config)
    with safe_open(tmp_path / "q" / "quantization.safetensors", "pt") as f:
        assert sum("s2d_kv.rotation" in k for k in f.keys()) == 3 * 2  # signs + one 16x16 factor per layer
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert not any("s2d_kv" in k for k in f.keys())  # the plain model cannot express R3
    again, _ = load_model(tmp_path / "q")
    assert torch.equal(_logits(again, x), before)


@pytest.mark.parametrize("clip", [0.0, 1.5, -0.1])
def test_a_kv_clip_outside_0_1_is_a_clear_error(clip):
    with pytest.raises(S2DError, match="kv_clip must be in"):
        QuantConfig.from_scheme("W4A4KV4", kv_clip=clip)


@pytest.mark.parametrize("option", [{"kv_bits": 4}, {"rotate_qk": True}])
def test_kv_options_on_an_encoder_are_a_clear_error(option):
    model, _ = tiny_model("bert")
    with pytest.raises(S2DError, match="no KV cache or RoPE"):
        quantize(model, QuantConfig.from_scheme("W8A8", **option), progress=False)


def test_the_cli_quantizes_the_kv_cache_and_records_it(tmp_path):
    from s2d import load_model
    from s2d.cli import main
    from s2d.eval.suite import EvalConfig, evaluate

    out = tmp_path / "q"
    argv = ["quantize", "tiny:llama", "--scheme", "W4A4KV4", "--option", "rotate_qk=true", "--eval", "ppl:wiki",
            "--ppl-tokens", "512", "--n-samples", "2", "--seq-len", "32", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["results"]["W4A4KV4 rtn"]
    assert entry["config"]["kv_bits"] == 4 and entry["config"]["rotate_qk"] is True
    model, tok = load_model(out / "model")
    ppl = evaluate(model, tok, EvalConfig.from_dict(metrics["eval_config"]), progress=False)["ppl:wiki@128"]["ppl"]
    assert ppl == entry["eval"]["ppl:wiki@128"]["ppl"]
