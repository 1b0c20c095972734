"""The affine quantize/dequantize family against a plain element-wise loop, ranges, idempotence, STE, observers."""

import itertools

import pytest
import torch

from s2d.errors import S2DError
from s2d.quant import QuantConfig, QuantSpec, RangeObserver, parse_scheme
from s2d.quant.primitives import (
    choose_qparams,
    dequantize_affine,
    fake_quantize,
    observe_range,
    quantize_affine,
)

GRANULARITIES = [("per_tensor", None), ("per_channel", None), ("per_token", None), ("per_group", 4)]


def _loop_reference(x: torch.Tensor, bits: int, symmetric: bool, granularity: str, group: int | None):
    """Codes and dequantized values computed one element at a time, with each block's range found by a loop."""
    shape = tuple(x.shape)
    last = shape[-1]

    def block_of(index):  # the key every element of one block shares
        if granularity == "per_tensor":
            return ()
        if granularity == "per_group":
            return (*index[:-1], index[-1] // group)
        return tuple(index[:-1])  # per_channel / per_token: one block per row of the last dimension

    indices = list(itertools.product(*(range(d) for d in shape)))
    lo, hi = {}, {}
    for idx in indices:
        key, v = block_of(idx), x[idx].item()
        lo[key], hi[key] = min(lo.get(key, v), v), max(hi.get(key, v), v)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    codes = torch.zeros(shape, dtype=torch.int64)
    deq = torch.zeros(shape)
    for idx in indices:
        key = block_of(idx)
        f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731  (mirror float32 arithmetic)
        if symmetric:
            amax = max(abs(lo[key]), abs(hi[key]))
            scale = f32(amax) / qmax if amax > 0 else f32(1.0)
            zero = 0
        else:
            a, b = min(lo[key], 0.0), max(hi[key], 0.0)
            scale = (f32(b) - f32(a)) / qmax if b > a else f32(1.0)
            zero = int(min(max(torch.round(-f32(a) / scale).item(), qmin), qmax))
        q = int(min(max(torch.round(x[idx] / scale).item() + zero, qmin), qmax))
        codes[idx] = q
        deq[idx] = (q - zero) * scale
    assert last == shape[-1]
    return codes, deq


@pytest.mark.parametrize("granularity,group", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_matches_elementwise_loop(granularity, group, symmetric, bits):
    gen = torch.Generator().manual_seed(bits * 10 + symmetric)
    x = torch.randn(3, 8, generator=gen) * torch.tensor([[0.1], [1.0], [5.0]])
    if granularity == "per_token":
        x = x.reshape(1, 3, 8)  # an activation (batch, tokens, channels)
    spec = QuantSpec(bits, symmetric, granularity, group)
    scale, zero = choose_qparams(x, spec)
    codes = quantize_affine(x, scale, zero, spec)
    deq = dequantize_affine(codes, scale, zero, spec.block_size(x.shape))
    ref_codes, ref_deq = _loop_reference(x, bits, symmetric, granularity, group)
    assert torch.equal(codes.long(), ref_codes)
    torch.testing.assert_close(deq, ref_deq, rtol=0, atol=0)
    torch.testing.assert_close(fake_quantize(x, spec), ref_deq, rtol=0, atol=0)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_codes_stay_in_integer_range(observer, symmetric, bits):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits)) ** 3  # heavy tails, so clipping bites
    spec = QuantSpec(bits, symmetric, "per_group", 16, observer, percentile=99.0)
    scale, zero = choose_qparams(x, spec)
    codes = quantize_affine(x, scale, zero, spec)
    assert codes.dtype == spec.int_dtype
    assert codes.min().item() >= spec.qmin and codes.max().item() <= spec.qmax
    assert codes.max().item() - codes.min().item() <= 2**bits - 1
    if observer == "minmax":  # no clipping: the extremes use the end codes
        assert codes.max().item() == spec.qmax or codes.min().item() == spec.qmin


@pytest.mark.parametrize("granularity,group", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_fake_quantize_is_idempotent(granularity, group, symmetric, bits):
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(bits))
    spec = QuantSpec(bits, symmetric, granularity, group)
    once = fake_quantize(x, spec)
    twice = fake_quantize(once, spec)
    s1, z1 = choose_qparams(once, spec)
    assert torch.equal(quantize_affine(once, s1, z1, spec), quantize_affine(twice, s1, z1, spec))
    torch.testing.assert_close(twice, once, rtol=1e-6, atol=0)
    assert once.unique().numel() <= 2**bits * s1.numel()


def test_ste_passes_gradients_through():
    x = torch.randn(4, 32, requires_grad=True)
    specs = (QuantSpec(4, True, "per_token"), QuantSpec(3, False, "per_group", 8), QuantSpec(8, True, "per_tensor"))
    for spec in specs:
        x.grad = None
        w = torch.randn(32)
        (fake_quantize(x, spec) * w).sum().backward()
        torch.testing.assert_close(x.grad, w.expand(4, 32), rtol=0, atol=0)
    y = fake_quantize(x, QuantSpec(4))
    assert not torch.equal(y, x)  # the forward value is the quantized one


def test_qat_linear_trains_through_the_ste():
    from s2d.quant import FakeQuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    fq = FakeQuantLinear.from_linear(lin, QuantSpec(4), QuantSpec(4, granularity="per_token"))
    x = torch.randn(5, 16)
    fq(x).pow(2).sum().backward()
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
    assert not torch.allclose(fq(x), lin(x))


def test_percentile_and_mse_observers():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1000, generator=gen)
    x[:, 0] = 50.0  # one outlier per row
    lo_mm, hi_mm = observe_range(x, QuantSpec(4, granularity="per_channel"))
    lo_p, hi_p = observe_range(x, QuantSpec(4, granularity="per_channel", observer="percentile", percentile=99.0))
    ref = torch.quantile(x, 0.99, dim=1, interpolation="lower")  # the nearest-rank 99th percentile
    torch.testing.assert_close(hi_p, ref[:, None])
    assert (hi_p < hi_mm).all() and (lo_p > lo_mm).all()
    spec_mm, spec_mse = QuantSpec(4), QuantSpec(4, observer="mse")
    x = torch.randn(8, 1000, generator=gen) ** 3  # heavy tails: clipping the range lowers the error
    err = lambda s: (fake_quantize(x, s) - x).pow(2).sum(1)  # noqa: E731
    assert (err(spec_mse) <= err(spec_mm) + 1e-6).all() and err(spec_mse).sum() < 0.9 * err(spec_mm).sum()


def test_range_observer_streams_exact_minmax():
    spec = QuantSpec(8, False, "per_tensor")
    obs = RangeObserver(spec)
    batches = [torch.randn(3, 7, 5) * (i + 1) for i in range(4)]
    for b in batches:
        obs.update(b)
    allx = torch.cat([b.flatten() for b in batches])
    assert obs.lo.item() == allx.min().item() and obs.hi.item() == allx.max().item()
    with pytest.raises(S2DError, match="calibration"):
        RangeObserver(spec).qparams()


@pytest.mark.parametrize("bits", [0, 1, 17, 32, 4.0, True, "4"])
def test_bits_outside_2_to_16_are_refused(bits):
    with pytest.raises(S2DError, match="from 2 to 16"):
        QuantSpec(bits)
    with pytest.raises(S2DError):
        QuantConfig(w_bits=bits)


def test_bad_granularity_inputs_are_refused():
    with pytest.raises(S2DError, match="does not divide the input size 100"):
        QuantSpec(4, granularity="per_group", group_size=32).block_size((8, 100))
    with pytest.raises(S2DError, match="positive group size"):
        QuantSpec(4, granularity="per_group")
    with pytest.raises(S2DError, match="unknown granularity"):
        QuantSpec(4, granularity="per_row")
    with pytest.raises(S2DError, match="unknown range observer"):
        QuantSpec(4, observer="kl")
    with pytest.raises(S2DError, match="static activation scales are per_tensor"):
        QuantConfig(a_static=True)
    with pytest.raises(S2DError, match="per_token is an activation"):
        QuantConfig(w_granularity="per_token")
    with pytest.raises(S2DError, match="SmoothQuant or rotation"):
        QuantConfig(smooth_alpha=0.5, rotate=True)


def test_schemes_and_config_round_trip():
    assert parse_scheme("W4A4") == (4, 4) and parse_scheme("w4a16") == (4, None) and parse_scheme("W3A4") == (3, 4)
    for name in ("W8A8", "W6A6", "W4A8", "W4A4", "W4A16", "W3A4"):
        cfg = QuantConfig.from_scheme(name, method="gptq", w_granularity="per_group", w_group_size=64)
        assert cfg.scheme == name
        assert QuantConfig.from_yaml(cfg.to_yaml()) == cfg == QuantConfig.from_json(cfg.to_json())
    with pytest.raises(S2DError, match="W<bits>A<bits>"):
        QuantConfig.from_scheme("INT4")
    with pytest.raises(S2DError, match="from 2 to 16"):
        QuantConfig.from_scheme("W1A8")


def test_lsq_gradients_match_the_paper():
    from s2d.quant.primitives import lsq_fake_quantize

    spec = QuantSpec(4, True, "per_channel")
    w = torch.tensor([[0.26, -0.9, 3.0, -5.0]], requires_grad=True)
    s = torch.tensor([[0.5]], requires_grad=True)
    out = lsq_fake_quantize(w, s, spec)
    out.sum().backward()
    x = w.detach() / 0.5
    inside = (x >= spec.qmin) & (x <= spec.qmax)
    assert torch.equal(out.detach(), torch.round(x.clamp(spec.qmin, spec.qmax)) * 0.5)
    assert torch.equal(w.grad, inside.float())
    expected = torch.where(inside, torch.round(x) - x, x.clamp(spec.qmin, spec.qmax)).sum()
    assert torch.allclose(s.grad, expected.reshape(1, 1))
