"""GPTQ against RTN, rotation and SmoothQuant preserving the function, QuantLinear, the default filter, errors."""

import copy

import pytest
import torch

from s2d.arch import describe
from s2d.assets.tiny import tiny_model
from s2d.errors import S2DError
from s2d.quant import QuantConfig, QuantLinear, QuantSpec, quantize, quantized_layers
from s2d.quant.gptq import HessianAccumulator, gptq_quantize_weight
from s2d.quant.primitives import choose_qparams, dequantize_affine, fake_quantize, quantize_affine
from s2d.quant.rotate import Rotation, hadamard_factors, random_rotation, rotate_model, sylvester
from s2d.quant.smooth import input_absmax, smooth_model


def _tokens(n=2, seq=48, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _rtn(weight, spec):
    scale, zero = choose_qparams(weight, spec)
    return dequantize_affine(quantize_affine(weight, scale, zero, spec), scale, zero, spec.block_size(weight.shape))


def _gptq(weight, x, spec, **kw):
    acc = HessianAccumulator(weight.shape[1])
    acc.add(x)
    q, scale, zero = gptq_quantize_weight(weight, acc.hessian(), spec, **kw)
    return dequantize_affine(q, scale, zero, spec.block_size(weight.shape))


def _out_err(x, w, w_hat):
    return (x @ (w - w_hat).t()).pow(2).sum().item() / (x @ w.t()).pow(2).sum().item()


# -- GPTQ ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, False, "per_group", 16), QuantSpec(4, True, "per_tensor")])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_a_random_layer(spec, act_order):
    gen = torch.Generator().manual_seed(0)
    # Correlated inputs with uneven channel scales, as real activations have: where GPTQ's error feedback pays.
    x = torch.randn(512, 16, generator=gen) @ torch.randn(16, 64, generator=gen) + 0.1 * torch.randn(512, 64,
                                                                                                       generator=gen)
    x = x * torch.linspace(0.2, 3.0, 64)
    w = torch.randn(32, 64, generator=gen)
    e_rtn = _out_err(x, w, _rtn(w, spec))
    e_gptq = _out_err(x, w, _gptq(w, x, spec, act_order=act_order, block_size=16))
    assert e_gptq <= e_rtn
    assert e_gptq < 0.7 * e_rtn


def test_gptq_at_8_bits_is_close_to_lossless():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 64, generator=gen), torch.randn(48, 64, generator=gen)
    w_hat = _gptq(w, x, QuantSpec(8))
    assert _out_err(x, w, w_hat) < 1e-4
    torch.testing.assert_close(w_hat, w, rtol=0, atol=0.05)


def test_gptq_codes_share_the_rtn_format():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(128, 32, generator=gen), torch.randn(8, 32, generator=gen)
    spec = QuantSpec(4, False, "per_group", 8)
    acc = HessianAccumulator(32)
    acc.add(x)
    q, scale, zero = gptq_quantize_weight(w, acc.hessian(), spec)
    s_rtn, z_rtn = choose_qparams(w, spec)
    assert q.dtype == torch.uint8 and q.min() >= 0 and q.max() <= 15
    assert torch.equal(scale, s_rtn) and torch.equal(zero, z_rtn)


def test_gptq_refuses_a_mismatched_hessian():
    with pytest.raises(S2DError, match="input columns"):
        gptq_quantize_weight(torch.randn(4, 8), torch.eye(6), QuantSpec(4))


@pytest.mark.real
def test_gptq_beats_rtn_on_a_real_smollm2_layer(smollm2):
    from s2d.arch import capture_block_inputs
    from s2d.assets import calibration_batch, wiki_text

    model, tok = smollm2
    desc = describe(model)
    batch = calibration_batch(tok, wiki_text("train"), 4, 128, seed=0)
    seen = []
    lin = desc.blocks[3].linears[0]  # q_proj of block 3, fed by the block's input norm
    handle = lin.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        cached = capture_block_inputs(desc, batch)
        hidden = cached.hidden
        with torch.no_grad():
            for i in range(4):
                hidden = desc.blocks[i].module(hidden, *cached.calls[i].args, **cached.calls[i].kwargs)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    finally:
        handle.remove()
    x, w = seen[-1], lin.module.weight.detach()
    for bits in (4, 3):
        spec = QuantSpec(bits)
        e_rtn, e_gptq = _out_err(x, w, _rtn(w, spec)), _out_err(x, w, _gptq(w, x, spec))
        assert e_gptq <= e_rtn, (bits, e_gptq, e_rtn)
    assert _out_err(x, w, _gptq(w, x, QuantSpec(8))) < 1e-4


# -- rotation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [64, 96, 576, 1536, 18])
def test_rotation_is_orthogonal_and_kronecker_apply_matches_dense(n):
    rot = random_rotation(n, seed=3)
    m = rot.matrix()
    torch.testing.assert_close(m @ m.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(rot.double()(x), x @ m, rtol=1e-10, atol=1e-10)
    if n != 18:  # 18 has no Sylvester x Paley factorization: the Haar-random fallback
        h = torch.kron(*hadamard_factors(n)) if len(hadamard_factors(n)) == 2 else hadamard_factors(n)[0]
        torch.testing.assert_close(h.abs() * n**0.5, torch.ones(n, n, dtype=torch.float64))
    else:
        assert hadamard_factors(n) is None


def test_smollm2_sizes_are_sylvester_times_paley():
    assert [f.shape[0] for f in hadamard_factors(576)] == [36, 16]
    assert [f.shape[0] for f in hadamard_factors(1536)] == [12, 128]
    h = sylvester(8)
    torch.testing.assert_close(h @ h.t(), 8 * torch.eye(8, dtype=torch.float64))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotation_preserves_a_tiny_model(family):
    model, _ = tiny_model(family)
    x = _tokens()
    ref = model(x).logits
    rotated = rotate_model(copy.deepcopy(model), seed=0)
    assert _rel(rotated(x).logits, ref) < 1e-4
    emb = rotated.get_input_embeddings().weight
    assert emb.data_ptr() != rotated.get_output_embeddings().weight.data_ptr()  # untied: turned differently


@pytest.mark.parametrize("family", ["gemma3", "bert", "mpnet", "vit"])
def test_rotation_refused_where_norms_cannot_fold(family):
    model, _ = tiny_model(family)
    with pytest.raises(S2DError, match=f"rotation is not supported for the {family} family"):
        quantize(model, QuantConfig.from_scheme("W4A4", rotate=True))


@pytest.mark.real
def test_rotation_and_smoothquant_preserve_smollm2(smollm2):
    model, tok = smollm2
    x = tok("The history of the city begins with a small market on the river.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(x).logits
        rotated = rotate_model(copy.deepcopy(model), seed=0)
        assert _rel(rotated(x).logits, ref) < 1e-4
        del rotated
        rotated = rotate_model(copy.deepcopy(model), seed=0, heads=True)  # R2 too (9 query, 3 KV heads)
        assert _rel(rotated(x).logits, ref) < 1e-4
        del rotated
        smoothed = copy.deepcopy(model)
        smooth_model(smoothed, x, alpha=0.5)
        assert _rel(smoothed(x).logits, ref) < 1e-4


# -- SmoothQuant ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "vit"])
def test_smoothquant_preserves_a_tiny_model(family):
    model, _ = tiny_model(family)
    x = torch.randn(2, 1, 28, 28) if family == "vit" else _tokens()
    key = "pixel_values" if family == "vit" else "input_ids"
    ref = model(**{key: x}).logits
    smoothed = copy.deepcopy(model)
    scales = smooth_model(smoothed, {key: x}, alpha=0.5)
    assert scales and all((s > 0).all() for s in scales.values())
    assert _rel(smoothed(**{key: x}).logits, ref) < 1e-4


def test_smoothquant_flattens_the_channel_ranges():
    model, _ = tiny_model("llama")
    x = _tokens()
    names = [lin.name for lin in describe(model).linears(("q", "gate", "down"))]
    with torch.no_grad():  # give the residual stream outlier channels, as pretrained models have
        for block in describe(model).blocks:
            for norm in block.norms:
                model.get_submodule(norm).weight[:4] *= 30.0
    before = input_absmax(model, x, names)
    smooth_model(model, x, alpha=0.5)
    after = input_absmax(model, x, names)
    for n in names:
        spread = lambda t: (t.max() / t.median()).item()  # noqa: E731
        assert spread(after[n]) < spread(before[n])


def test_smoothquant_refused_without_a_place_to_fold():
    model, _ = tiny_model("bert")
    with pytest.raises(S2DError, match="nowhere to fold"):
        smooth_model(model, _tokens(), 0.5)


# -- quantize(), QuantLinear, filters, calibration ------------------------------------------------------------------


def test_quantlinear_forward_equals_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    w_spec, a_spec = QuantSpec(4, False, "per_group", 8), QuantSpec(6, True, "per_token")
    q = QuantLinear.from_linear(lin, w_spec, a_spec)
    x = torch.randn(3, 5, 32)
    ref = torch.nn.functional.linear(fake_quantize(x, a_spec), _rtn(lin.weight.detach(), w_spec), lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)
    assert q.qweight.dtype == torch.uint8 and q.weight_scale.shape == (16, 4)


def test_default_filter_swaps_every_block_linear_and_nothing_else():
    model, _ = tiny_model("llama")
    quantize(model, QuantConfig.from_scheme("W8A8"))
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(lin.name for lin in describe(model).linears()) and len(layers) == 21
    assert isinstance(model.lm_head, torch.nn.Linear)
    only_down = tiny_model("llama")[0]
    quantize(only_down, QuantConfig.from_scheme("W4A4"), filter=lambda m, name: name.endswith("down_proj"))
    assert sorted(quantized_layers(only_down)) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


def test_w8a8_is_close_and_w4a4_is_not():
    model, _ = tiny_model("llama")
    x = _tokens()
    ref = model(x).logits
    e8 = _rel(quantize(copy.deepcopy(model), QuantConfig.from_scheme("W8A8"))(x).logits, ref)
    e4 = _rel(quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A4"))(x).logits, ref)
    assert e8 < 0.02 and e4 > 5 * e8


def test_static_activation_scales_are_calibrated():
    model, _ = tiny_model("qwen2")
    x = _tokens()
    cfg = QuantConfig.from_scheme("W8A8", a_static=True, a_granularity="per_tensor")
    quantize(model, cfg, calib=x)
    for layer in quantized_layers(model).values():
        assert layer.observer is None and layer.act_scale.item() != 1.0
    ref = tiny_model("qwen2")[0](x).logits
    assert _rel(model(x).logits, ref) < 0.05


@pytest.mark.parametrize("overrides,what", [({"method": "gptq"}, "GPTQ"),
                                            ({"a_static": True, "a_granularity": "per_tensor"}, "static"),
                                            ({"smooth_alpha": 0.5}, "SmoothQuant")])
def test_calibration_missing_is_refused(overrides, what):
    model, _ = tiny_model("llama")
    with pytest.raises(S2DError, match=f"{what}.*needs calibration data"):
        quantize(model, QuantConfig.from_scheme("W4A8", **overrides))
    assert not quantized_layers(model)  # refused before touching the model


def test_gptq_model_beats_rtn_end_to_end_on_tiny_llama():
    model, _ = tiny_model("llama")
    calib = _tokens(8, 64)
    ref = model(calib).logits
    cfg = dict(w_granularity="per_channel")
    rtn = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W3A16", **cfg))
    gptq = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W3A16", method="gptq", **cfg), calib=calib,
                    progress=False)
    assert _rel(gptq(calib).logits, ref) < _rel(rtn(calib).logits, ref)


def test_rotation_then_gptq_runs_and_keeps_online_rotations():
    model, tok = tiny_model("llama")
    x = _tokens(4, 64)
    q = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A4", method="gptq", rotate=True), calib=x,
                 progress=False)
    downs = [m for n, m in quantized_layers(q).items() if n.endswith("down_proj")]
    assert downs and all(isinstance(m.rotation, Rotation) for m in downs)
    assert torch.isfinite(q(x).logits).all()
