"""Activation clipping, the full symmetric grid and per-token groups, each against a plain quantize loop."""

import pytest
import torch

from s2d.errors import S2DError
from s2d.quant import QuantConfig, quantize
from s2d.quant.primitives import QuantSpec, fake_quantize


def _loop(x: torch.Tensor, bits: int, clip: float = 1.0, full: bool = False, group: int | None = None,
          symmetric: bool = True) -> torch.Tensor:
    """The obvious implementation: one token (row) or group at a time, scalars throughout."""
    out = torch.empty_like(x)
    group = group or x.shape[-1]
    for i in range(x.shape[0]):
        for g0 in range(0, x.shape[1], group):
            v = x[i, g0:g0 + group].double()
            if symmetric:
                amax = float(v.abs().max()) * clip
                scale = amax / ((2 ** (bits - 1) - 1) + (0.5 if full else 0.0))
                q = torch.clamp(torch.round(v / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                out[i, g0:g0 + group] = (q * scale).float()
            else:
                lo, hi = min(float(v.min()) * clip, 0.0), max(float(v.max()) * clip, 0.0)
                scale = (hi - lo) / (2**bits - 1)
                zero = max(0.0, min(2**bits - 1, round(-lo / scale)))
                q = torch.clamp(torch.round(v / scale) + zero, 0, 2**bits - 1)
                out[i, g0:g0 + group] = ((q - zero) * scale).float()
    return out


@pytest.mark.parametrize("clip", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("full", [False, True], ids=["restricted", "full"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_per_token_clipping_and_grids_match_a_loop(clip, full, symmetric):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3
    x[2, 5] = 40.0  # an outlier token
    spec = QuantSpec(4, symmetric, "per_token", clip=clip, grid="full" if full else "restricted")
    assert torch.allclose(fake_quantize(x, spec), _loop(x, 4, clip, full, symmetric=symmetric), atol=1e-5)


@pytest.mark.parametrize("group", [16, 32])
def test_per_token_groups_match_a_loop(group):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(4, True, "per_group", group_size=group, clip=0.9)
    assert torch.allclose(fake_quantize(x, spec), _loop(x, 4, 0.9, group=group), atol=1e-5)


def test_the_full_grid_has_gptqs_finer_step_and_lowers_the_error_on_gaussian_weights():
    ramp = torch.linspace(-1, 1, 1001).reshape(1, -1)

    def step(grid):
        return float(torch.unique(fake_quantize(ramp, QuantSpec(4, True, "per_channel", grid=grid))).diff().min())
    assert step("restricted") == pytest.approx(1 / 7) and step("full") == pytest.approx(2 / 15)
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(2))
    err = {g: float((fake_quantize(w, QuantSpec(4, True, "per_channel", grid=g)) - w).pow(2).mean())
           for g in ("restricted", "full")}
    assert err["full"] < err["restricted"]


def test_clipping_saturates_the_largest_values_and_refines_the_rest():
    x = torch.tensor([[1.0, -2.0, 3.0, 10.0]])
    clipped = fake_quantize(x, QuantSpec(4, True, "per_token", clip=0.5))
    assert clipped[0, 3] == pytest.approx(5.0)  # saturated at clip·absmax
    small = (clipped[0, :3] - x[0, :3]).abs().max()
    assert small < (fake_quantize(x, QuantSpec(4, True, "per_token"))[0, :3] - x[0, :3]).abs().max()


@pytest.mark.parametrize("clip", [0.0, 1.2, -0.5, "x"])
def test_a_clip_ratio_outside_zero_one_is_refused(clip):
    with pytest.raises(S2DError, match="clip"):
        QuantConfig.from_scheme("W4A4", a_clip=clip)


def test_an_unknown_grid_and_stray_group_sizes_are_refused():
    with pytest.raises(S2DError, match="grid"):
        QuantConfig.from_scheme("W4A4", grid="wide")
    with pytest.raises(S2DError, match="a_group_size"):
        QuantConfig.from_scheme("W4A4", a_group_size=32)
    with pytest.raises(S2DError, match="per_token, per_group"):
        QuantConfig.from_scheme("W4A4", a_granularity="per_channel")


def test_an_activation_group_that_does_not_divide_a_linear_is_named():
    from s2d.assets import load_model

    model, _ = load_model("tiny:llama")
    config = QuantConfig.from_scheme("W4A4", a_granularity="per_group", a_group_size=48)
    with pytest.raises(S2DError, match=r"a_group_size=48 does not divide the input size 64 of model\.layers\.0"):
        quantize(model, config, progress=False)


def test_the_new_options_survive_save_and_reload(tmp_path):
    from s2d import load_model
    from s2d.quant import save_quantized

    model, tok = load_model("tiny:llama")
    config = QuantConfig.from_scheme("W4A4", a_clip=0.9, w_clip=0.95, grid="full", a_granularity="per_group",
                                     a_group_size=32, a_symmetric=False)
    quantize(model, config, progress=False)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_quantized(model, tmp_path / "q", tok, config)
    again, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)
    assert again.s2d_quant_config == config


def test_the_clip_search_picks_each_layers_least_error_candidate_and_survives_reload(tmp_path):
    from s2d import load_model
    from s2d.quant import save_quantized
    from s2d.quant.api import CLIP_STEPS, quantized_layers
    from s2d.quant.primitives import QuantSpec

    model, tok = load_model("tiny:llama")
    calib = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(4))
    config = QuantConfig.from_scheme("W4A4", a_clip_search=True, clip_search_samples=4)
    quantize(model, config, calib=calib, progress=False)
    clips = {n: float(m.act_clip) for n, m in quantized_layers(model).items()}
    steps32 = {float(torch.tensor(c)) for c in CLIP_STEPS}  # the buffer holds float32
    assert set(clips.values()) <= steps32 and len(clips) == 21

    # the brute-force answer for one layer: its inputs during the search are those of the quantized model
    q = quantized_layers(model)["model.layers.0.mlp.down_proj"]
    captured = []
    handle = q.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    x, w = captured[0], q.weight

    def error(c):
        xq = fake_quantize(x, QuantSpec(4, True, "per_token", clip=c))
        return float((xq @ w.T - x @ w.T).double().pow(2).sum())
    assert clips["model.layers.0.mlp.down_proj"] == float(torch.tensor(min(CLIP_STEPS, key=error)))

    save_quantized(model, tmp_path / "q", tok, config)
    again, _ = load_model(tmp_path / "q")
    assert {n: float(m.act_clip) for n, m in quantized_layers(again).items()} == clips
    with torch.no_grad():
        assert torch.equal(again(input_ids=calib).logits, model(input_ids=calib).logits)


def test_the_clip_search_needs_dynamic_activation_scales():
    with pytest.raises(S2DError, match="a_clip_search"):
        QuantConfig.from_scheme("W4A16", a_clip_search=True)
    with pytest.raises(S2DError, match="a_clip_search"):
        QuantConfig.from_scheme("W4A4", a_clip_search=True, a_static=True, a_granularity="per_tensor")
