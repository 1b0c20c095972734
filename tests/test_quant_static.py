"""Per-tensor static activation scales (minmax, percentile, MSE) against a hand-written calibration loop, and
RepQ-ViT's LayerNorm reparameterization: function-preserving, equalizing, saved as plain weights, refused where
it cannot preserve the function."""

import copy

import pytest
import torch
from torch import nn

from s2d.arch import describe
from s2d.assets.tiny import tiny_model
from s2d.errors import S2DError
from s2d.quant import QuantConfig, QuantSpec, RangeObserver, prepare, quantize, quantized_layers
from s2d.quant.observer import STEPS
from s2d.quant.reparam import channel_ranges, reparameterize, reparameterize_norms

SHRINKS = [1 - i / 100 for i in range(80)]  # the MSE observer's candidate clips of the min-max range


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _pixels(n=32, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _tokens(n=4, seq=24, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# -- the reference: every input of every Linear over the calibration batch, and each observer by brute force ------


@torch.no_grad()
def _inputs_by_hand(model: nn.Module, calib: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """All values each named Linear reads over the whole batch (one forward, no chunks)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach().flatten().clone())) for n in names]
    model(**calib)
    for h in hooks:
        h.remove()
    return seen


def _fq(x, scale, zero, qmin, qmax):
    return (torch.round(x / scale + zero).clamp(qmin, qmax) - zero) * scale


def _params(lo, hi, bits, symmetric):
    """Scale and zero of range [lo, hi], written out: restricted symmetric grid, or asymmetric over a range with 0."""
    if symmetric:
        return max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1), 0.0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1)
    return scale, round(-lo / scale), 0, 2**bits - 1


def _reference_scale(x: torch.Tensor, observer: str, bits: int, symmetric: bool, pct: float = 99.0):
    x = x.double()
    if observer == "minmax":
        return _params(x.min().item(), x.max().item(), bits, symmetric)[0]
    if observer == "percentile":
        ordered = x.sort().values
        k = int(torch.tensor(pct / 100 * x.numel()).ceil())  # nearest rank, each tail
        return _params(ordered[x.numel() - k].item(), ordered[k - 1].item(), bits, symmetric)[0]
    errors = [_mse(x, c * x.min().item(), c * x.max().item(), bits, symmetric) for c in SHRINKS]
    best = min(range(len(errors)), key=errors.__getitem__)
    return _params(SHRINKS[best] * x.min().item(), SHRINKS[best] * x.max().item(), bits, symmetric)[0]


def _mse(x, lo, hi, bits, symmetric):
    scale, zero, qmin, qmax = _params(lo, hi, bits, symmetric)
    return float((_fq(x, scale, zero, qmin, qmax) - x).pow(2).sum())


def _mse_at_scale(x, scale, bits, symmetric):
    """The error of `scale` on x for a symmetric grid (an asymmetric one also needs its zero: not used here)."""
    assert symmetric
    qmax = 2 ** (bits - 1) - 1
    return float((_fq(x.double(), scale, 0.0, -qmax - 1, qmax) - x.double()).pow(2).sum())


# -- observers -----------------------------------------------------------------------------------------------------


def _heavy_batches(seed=0):
    """Heavy-tailed batches whose spread grows 30x from the first to the last (the histogram must slide), after
    one of zeros (no range yet)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.zeros(4, 50, 16)] + [torch.randn(4, 50, 16, generator=gen) ** 3 * s + 0.3 for s in (0.1, 1, 0.5, 3)]


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_streaming_observer_matches_the_whole_batch(observer, symmetric):
    spec = QuantSpec(4, symmetric, "per_tensor", observer=observer, percentile=99.0)
    batches = _heavy_batches()
    obs = RangeObserver(spec)
    for b in batches:
        obs.update(b)
    scale = float(obs.qparams()[0])
    x = torch.cat([b.flatten() for b in batches]).double()
    ref = _reference_scale(x, observer, 4, symmetric)
    if observer == "minmax":
        assert scale == pytest.approx(ref, rel=1e-6)
    elif observer == "percentile":  # located inside one histogram bin, at most 1/STEPS of its values wide
        assert scale == pytest.approx(ref, rel=1 / STEPS)
        assert scale < 0.5 * _reference_scale(x, "minmax", 4, symmetric)  # the tails were cut
    else:
        best = _mse(x, *_range_of(ref, x, symmetric), 4, symmetric)
        ours = _mse(x, *_range_of(scale, x, symmetric), 4, symmetric)
        minmax = _mse(x, x.min().item(), x.max().item(), 4, symmetric)
        assert ours <= 1.002 * best and minmax > 1.5 * best  # the search pays, and found the best clip


def _range_of(scale, x, symmetric):
    """The shrunk min-max range whose scale is `scale` (the MSE grid shrinks lo and hi by the same factor)."""
    c = scale / _reference_scale(x, "minmax", 4, symmetric)
    return c * x.min().item(), c * x.max().item()


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_static_scales_of_a_vit_match_a_hand_calibration(observer):
    """Every QuantLinear's static scale against the brute-force observer on all its inputs over the batch of 32
    images, calibrated by quantize in chunks of 8 (weights in FP, so the FP model sees the same inputs)."""
    model, _ = tiny_model("vit")
    calib = {"pixel_values": _pixels()}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "classifier"]
    inputs = _inputs_by_hand(model, calib, names)
    config = QuantConfig.from_scheme("W16A4", a_static=True, a_granularity="per_tensor", a_observer=observer,
                                     percentile=99.0)
    quantize(model, config, calib=calib, chunk_size=8, progress=False)
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(names)
    for name, layer in layers.items():
        x, scale = inputs[name].double(), layer.act_scale.item()
        ref = _reference_scale(x, observer, 4, True)
        if observer == "minmax":
            assert scale == pytest.approx(ref, rel=1e-6), name
        elif observer == "percentile":
            assert scale == pytest.approx(ref, rel=1 / STEPS), name
        else:
            assert _mse_at_scale(x, scale, 4, True) <= 1.002 * _mse_at_scale(x, ref, 4, True), name


# -- the LayerNorm reparameterization ------------------------------------------------------------------------------


def _uneven(model, seed=0):
    """Norm gains spread over e^±2 and biases of order 1, as in a trained model (a fresh one has gains 1 and
    biases 0, whose channels need no evening out)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(torch.exp(torch.randn(m.weight.shape, generator=gen)))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model


def _calib(family):
    return {"pixel_values": _pixels()} if family == "vit" else {"input_ids": _tokens()}


def _norm_state(model):
    return {n: t.clone() for n, t in model.state_dict().items() if "norm" in n.lower()}


STATIC = dict(a_static=True, a_granularity="per_tensor")


@pytest.mark.parametrize("family", ["vit", "llama", "qwen2", "gemma3"])
def test_the_reparameterization_preserves_the_function(family):
    model, _ = tiny_model(family)
    _uneven(model)
    calib = _calib(family)
    with torch.no_grad():
        ref = model(**calib).logits
    before = _norm_state(model)
    ratios = reparameterize_norms(model, calib)
    assert len(ratios) == 2 * len(describe(model).blocks)  # both pre-norms of every block, not the final norm
    with torch.no_grad():
        assert _rel(model(**calib).logits, ref) < 1e-5
    changed = {n.rpartition(".")[0] for n, t in _norm_state(model).items() if not torch.equal(t, before[n])}
    assert changed == set(ratios)


@pytest.mark.parametrize("family", ["vit", "llama"])
def test_afterwards_every_channel_spans_the_same_range(family):
    """LayerNorm (with a bias): each channel centred on 0 with the mean span; RMSNorm: the same max|y|."""
    model, _ = tiny_model(family)
    _uneven(model)
    calib = _calib(family)
    names = list(reparameterize_norms(model, calib))
    for name, (lo, hi) in channel_ranges(model, calib["pixel_values" if family == "vit" else "input_ids"],
                                         names).items():
        if family == "vit":
            span = hi - lo
            assert (span.max() / span.min()).item() < 1 + 1e-4, name
            assert ((hi + lo).abs() / span).max().item() < 1e-4, name
        else:
            amax = torch.maximum(lo.abs(), hi.abs())
            assert (amax.max() / amax.min()).item() < 1 + 1e-4, name


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_reparameterization_lowers_the_static_error_of_a_vit(symmetric):
    model, _ = tiny_model("vit")
    _uneven(model)
    calib = _calib("vit")
    with torch.no_grad():
        ref = model(**calib).logits
    errors = {}
    for reparam in (False, True):
        config = QuantConfig.from_scheme("W8A6", ln_reparam=reparam, a_symmetric=symmetric, **STATIC)
        quantized = quantize(copy.deepcopy(model), config, calib=calib, progress=False)
        with torch.no_grad():
            errors[reparam] = _rel(quantized(**calib).logits, ref)
    assert errors[True] < 0.6 * errors[False]


def test_post_norm_families_are_refused_because_the_residual_cannot_compensate():
    model, _ = tiny_model("bert")
    config = QuantConfig.from_scheme("W8A8", ln_reparam=True, **STATIC)
    with pytest.raises(S2DError, match="post-norms.*residual"):
        quantize(model, config, calib=_tokens(), progress=False)
    assert not quantized_layers(model)  # refused before any work
    # Why: BERT's attention.output.LayerNorm feeds fc1 and the residual; compensating fc1 alone changes the output.
    _uneven(model)
    x = _tokens()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    layer = model.bert.encoder.layer[0]
    norm = layer.attention.output.LayerNorm
    lo, hi = channel_ranges(model, x, ["bert.encoder.layer.0.attention.output.LayerNorm"]).popitem()[1]
    reparameterize(norm, [layer.intermediate.dense], lo, hi)
    with torch.no_grad():
        assert _rel(model(input_ids=x).logits, ref) > 1e-3


def test_with_rotation_it_reparameterizes_the_rotated_norms():
    """QuaRot folds the RMSNorm gains into the Linears (gain 1); the reparameterization then evens out the
    rotated channels, still function-preserving."""
    model, _ = tiny_model("llama")
    _uneven(model)
    calib = _tokens()
    with torch.no_grad():
        ref = model(input_ids=calib).logits
    config = QuantConfig.from_scheme("W8A8", rotate=True, ln_reparam=True, **STATIC)
    prepare(model, config, calib=calib, progress=False)
    with torch.no_grad():
        assert _rel(model(input_ids=calib).logits, ref) < 1e-4
    gains = [describe(model).module(n).weight for b in describe(model).blocks for n in b.norms]
    assert all(not torch.allclose(g, torch.ones_like(g)) for g in gains)  # not left at the folded gain of 1


@pytest.mark.parametrize("reparam", [False, True])
def test_a_static_model_reloads_identically_with_its_norms_in_the_plain_weights(tmp_path, reparam):
    from safetensors.torch import load_file

    from s2d import load_model
    from s2d.quant import save_quantized

    model, _ = load_model("tiny:vit")
    _uneven(model)
    original = _norm_state(model)
    calib = _calib("vit")
    config = QuantConfig.from_scheme("W4A8", ln_reparam=reparam, a_observer="percentile", **STATIC)
    quantize(model, config, calib=calib, progress=False)
    with torch.no_grad():
        before = model(**calib).logits
    save_quantized(model, tmp_path / "q", None, config)
    again, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(**calib).logits, before)
    file = load_file(str(tmp_path / "q" / "model.safetensors"))
    # transformers may write ViT's blocks under their older name (vit.encoder.layer.i for vit.layers.i)
    saved = {n: next(file[k] for k in file if k.endswith("." + n.partition("layers.")[2])) for n in original
             if "layernorm_" in n}
    assert len(saved) == 4 * len(describe(model).blocks)  # gain and bias of both pre-norms
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in saved.items())
    assert any(not torch.equal(t, original[n]) for n, t in saved.items()) == reparam
    assert again.s2d_quant_config.ln_reparam == reparam


def test_ln_reparam_without_its_inputs_is_refused():
    with pytest.raises(S2DError, match="a_static=True and a_granularity='per_tensor'"):
        QuantConfig.from_scheme("W8A8", ln_reparam=True)  # dynamic per-token scales
    with pytest.raises(S2DError, match="SmoothQuant or ln_reparam"):
        QuantConfig.from_scheme("W8A8", ln_reparam=True, smooth_alpha=0.5, **STATIC)
    model, _ = tiny_model("vit")
    config = QuantConfig.from_scheme("W8A8", ln_reparam=True, **STATIC)
    assert config.needs_calibration
    for call in (lambda: quantize(model, config, progress=False), lambda: prepare(model, config),
                 lambda: reparameterize_norms(model, None)):
        with pytest.raises(S2DError, match="ln_reparam.*needs calibration data: pass calib="):
            call()
    assert not quantized_layers(model)
    with pytest.raises(S2DError, match="no norm that feeds a quantized Linear"):
        reparameterize_norms(model, _calib("vit"), filter=lambda m, n: False)
