"""RepQ-ViT's regime: log√2 softmax quantization (s2d.quant.softmax) and the W8A8 patch embedding (s2d.quant.conv)."""

import copy
import math

import pytest
import torch
from torch import nn

from s2d.arch import describe
from s2d.arch.runner import model_inputs
from s2d.assets import load_model
from s2d.errors import S2DError
from s2d.quant import QuantConfig, quantize
from s2d.quant.conv import QuantConv2d
from s2d.quant.kvcache import ATTR, AttentionQuant
from s2d.quant.softmax import QUANTILES, LogSqrt2Quant, log_sqrt2_quantize

FAMILIES = ["llama", "qwen2", "gemma3", "bert", "mpnet", "vit"]


def _batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if describe(model).family.main_input == "pixel_values":
        c, s = model.config.num_channels, model.config.image_size
        return {"pixel_values": torch.randn(n, c, s, s, generator=g)}
    return torch.randint(0, 200, (n, 16), generator=g)


def _logits(model, batch):
    with torch.no_grad():
        return model(**model_inputs(describe(model), batch)).logits


def _hidden(model, batch):
    """The last hidden state: a tiny encoder's pooled logits barely move, its tokens do."""
    with torch.no_grad():
        return model(**model_inputs(describe(model), batch), output_hidden_states=True).hidden_states[-1]


def _quantizers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LogSqrt2Quant)}


# -- the quantizer against the formula, one element at a time -----------------------------------------------------


def _naive_log_sqrt2(p, delta, bits):
    out = []
    for x in p.reshape(-1).tolist():
        q = math.inf if x == 0 else round(-2 * math.log2(x / delta))
        if q >= 2**bits:
            out.append(0.0)
            continue
        q = min(max(q, 0), 2**bits - 1)
        out.append(delta * 2 ** (-math.ceil(q / 2)) * (1 + (math.sqrt(2) - 1) * (q % 2)))
    return torch.tensor(out).reshape(p.shape)


@pytest.mark.parametrize("bits,delta", [(4, 1.0), (3, 0.5), (8, 0.8)])
def test_log_sqrt2_matches_the_formula_element_by_element(bits, delta):
    g = torch.Generator().manual_seed(bits)
    p = torch.softmax(3 * torch.randn(6, 40, generator=g), -1)
    p[0, :5] = 0.0  # exact zeros underflow to 0
    p[1, 0] = 1.0  # above delta: clamped to code 0, i.e. delta
    got = log_sqrt2_quantize(p, torch.tensor(delta), bits)
    want = _naive_log_sqrt2(p, delta, bits)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert (got[0, :5] == 0).all() and got[1, 0] == pytest.approx(delta)
    # every nonzero output is delta·√2^-q for a code q < 2^bits
    nz = got[got > 0]
    codes = -2 * torch.log2(nz / delta)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.max() <= 2**bits - 1 + 1e-4


# -- the eager path reproduces every family's own attention ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_path_without_rounding_equals_the_model(family):
    model, _ = load_model(f"tiny:{family}")
    model.eval()
    batch = _batch(model)
    reference = _logits(model, batch)
    q = quantize(copy.deepcopy(model), QuantConfig(w_bits=None, a_bits=None, softmax_bits=4), calib=batch,
                 progress=False)
    hooks = [m for m in q.modules() if isinstance(m, AttentionQuant)]
    assert len(hooks) == len(describe(q).blocks)
    rounded = _hidden(q, batch)
    calls = []
    for hook in hooks:  # the same path, with the rounding replaced by the identity (and counted)
        hook.softmax = _Counting(calls)
    assert torch.allclose(_logits(q, batch), reference, atol=1e-5, rtol=1e-5)
    assert len(calls) == len(hooks)  # the eager path really ran, once per layer
    assert (rounded - _hidden(model, batch)).abs().max() > 2e-4  # rounding moves it 20x the 1e-5 above


class _Counting(nn.Module):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def forward(self, p):
        self.calls.append(p.shape)
        return p


@pytest.mark.parametrize("family", ["llama", "mpnet", "vit"])
def test_calibrated_delta_is_the_least_error_candidate(family, monkeypatch):
    model, _ = load_model(f"tiny:{family}")
    model.eval()
    batch = _batch(model, n=4)
    seen = {}
    observe = LogSqrt2Quant.observe

    def record(self, p):  # every probability tensor each quantizer is calibrated on
        seen.setdefault(id(self), []).append(p.detach().clone())
        observe(self, p)

    monkeypatch.setattr(LogSqrt2Quant, "observe", record)
    q = quantize(copy.deepcopy(model), QuantConfig(w_bits=None, a_bits=None, softmax_bits=4), calib=batch,
                 chunk_size=2, progress=False)
    quants = _quantizers(q)
    assert quants and set(seen) == {id(m) for m in quants.values()}
    for m in quants.values():
        first, everything = seen[id(m)][0], seen[id(m)]
        flat = first.reshape(-1)
        want = torch.cat([torch.ones(1), flat.max().reshape(1), torch.quantile(flat, torch.tensor(QUANTILES))])
        assert torch.allclose(m.candidates, want[want > 0])
        errors = [sum(float((log_sqrt2_quantize(p, d, 4) - p).double().pow(2).sum()) for p in everything)
                  for d in m.candidates]
        assert len(everything) == 2  # two chunks of 2: errors summed over both
        assert float(m.delta) == float(m.candidates[errors.index(min(errors))])
        assert errors[errors.index(min(errors))] < errors[0] or float(m.delta) == 1.0


def test_softmax_composes_with_kv_quantization_and_r3():
    model, _ = load_model("tiny:llama")
    model.eval()
    batch = _batch(model)
    both = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W16A16KV4", rotate_qk=True, softmax_bits=4),
                    calib=batch, progress=False)
    kv_only = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W16A16KV4", rotate_qk=True), calib=batch,
                       progress=False)
    hook = both.model.layers[0].self_attn.s2d_kv
    assert hook.rotation is not None and hook.spec is not None and hook.softmax is not None
    assert both.config._attn_implementation == "s2d_kv+eager"
    for m in both.modules():  # without the rounding, both-on is the KV/R3 model exactly
        if isinstance(m, AttentionQuant):
            m.softmax = nn.Identity()
    assert torch.allclose(_logits(both, batch), _logits(kv_only, batch), atol=1e-5)


# -- the patch embedding ------------------------------------------------------------------------------------------


def _naive_conv_quant(weight, bits):
    """Symmetric per-output-channel RTN on the restricted grid, one filter at a time."""
    out = torch.empty_like(weight)
    top = 2 ** (bits - 1) - 1
    for o in range(weight.shape[0]):
        w = weight[o]
        scale = w.abs().max() / top
        out[o] = torch.clamp(torch.round(w / scale), -top - 1, top) * scale
    return out


@pytest.mark.parametrize("a_static", [False, True])
def test_patch_embedding_weights_and_input_are_quantized_per_channel_and_per_tensor(a_static):
    model, _ = load_model("tiny:vit")
    model.eval()
    batch = _batch(model)
    name = describe(model).patch_embed
    conv = copy.deepcopy(model.get_submodule(name))
    extra = {"a_static": True, "a_granularity": "per_tensor"} if a_static else {}
    q = quantize(copy.deepcopy(model), QuantConfig(w_bits=None, a_bits=None, patch_embed_bits=4, **extra),
                 calib=batch, progress=False)
    layer = q.get_submodule(name)
    assert isinstance(layer, QuantConv2d)
    want_w = _naive_conv_quant(conv.weight.detach(), 4)
    assert torch.allclose(layer.weight, want_w, atol=1e-7)
    x = batch["pixel_values"]
    top = 7
    scale = x.abs().max() / top  # per tensor: one scale over the whole batch (static: calibrated on the same)
    xq = torch.clamp(torch.round(x / scale), -8, top) * scale
    want = nn.functional.conv2d(xq, want_w, conv.bias, conv.stride)
    with torch.no_grad():
        assert torch.allclose(layer(x), want, atol=1e-5)
        assert not torch.allclose(layer(x), conv(x), atol=1e-3)


def test_patch_embedding_on_a_language_model_is_a_clear_error():
    model, _ = load_model("tiny:llama")
    with pytest.raises(S2DError, match="only vision models have a patch embedding"):
        quantize(model, QuantConfig(patch_embed_bits=8), calib=_batch(model), progress=False)


# -- save and reload ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "mpnet", "gemma3"])
def test_repq_setting_reloads_identically(family, tmp_path):
    from s2d import load_model as load_saved
    from s2d.quant import save_quantized

    model, tok = load_model(f"tiny:{family}")
    model.eval()
    batch = _batch(model)
    vision = family == "vit"
    config = QuantConfig.from_scheme("W4A4", a_static=True, a_granularity="per_tensor", ln_reparam=family != "mpnet",
                                     softmax_bits=4, patch_embed_bits=8 if vision else None,
                                     layer_schemes={"head": "W8A8"} if vision else {})
    quantize(model, config, calib=batch, progress=False)
    if vision:  # the classifier, left in FP by default, is W8A8 here
        head = model.get_submodule(describe(model).head)
        assert (head.w_spec.bits, head.a_spec.bits, head.a_static) == (8, 8, True)
    before = _logits(model, batch)
    save_quantized(model, tmp_path / "q", tok, config)
    again, _ = load_saved(tmp_path / "q")
    deltas = {n: float(m.delta) for n, m in _quantizers(model).items()}
    assert deltas == {n: float(m.delta) for n, m in _quantizers(again).items()} and len(deltas) > 0
    if vision:
        assert isinstance(again.get_submodule(describe(again).patch_embed), QuantConv2d)
    assert torch.equal(_logits(again, batch), before)


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,match", [({"softmax_bits": 1}, "softmax_bits"),
                                           ({"softmax_bits": 4.0}, "softmax_bits"),
                                           ({"patch_embed_bits": 40}, "patch_embed_bits")])
def test_bad_bits_are_clear_errors(options, match):
    with pytest.raises(S2DError, match=match):
        QuantConfig(**options)


def test_softmax_needs_calibration_data():
    model, _ = load_model("tiny:vit")
    with pytest.raises(S2DError, match="softmax_bits.*calibration|calibration.*softmax_bits"):
        quantize(model, QuantConfig(softmax_bits=4), progress=False)


def test_softcapped_attention_is_refused():
    model, _ = load_model("tiny:gemma3")
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 50.0
    with pytest.raises(S2DError, match="soft-caps"):
        quantize(model, QuantConfig(softmax_bits=4), calib=_batch(model), progress=False)


def test_qat_refuses_the_ptq_only_settings():
    from s2d.quant import prepare_qat

    model, _ = load_model("tiny:vit")
    with pytest.raises(S2DError, match="QAT"):
        prepare_qat(model, QuantConfig(softmax_bits=4))


def test_head_pattern_on_a_model_without_a_linear_head_is_a_clear_error():
    model, _ = load_model("tiny:llama")
    model.lm_head = nn.Identity()
    with pytest.raises(S2DError, match="no Linear head"):
        quantize(model, QuantConfig(layer_schemes={"head": "W8A8"}), progress=False)


def test_saved_deltas_missing_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from s2d import load_model as load_saved
    from s2d.quant import save_quantized

    model, tok = load_model("tiny:vit")
    batch = _batch(model)
    quantize(model, QuantConfig(softmax_bits=4), calib=batch, progress=False)
    save_quantized(model, tmp_path / "q", tok)
    path = tmp_path / "q" / "quantization.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.endswith(f"{ATTR}.softmax.delta")}
    save_file(tensors, str(path), metadata={"format": "s2d-fake-quant"})
    with pytest.raises(S2DError, match="no softmax delta"):
        load_saved(tmp_path / "q")
