"""QAT with per-tensor static activation scales: the fake-quant forward, LSQ's gradient, calibration, training,
save and reload, and the errors for settings it cannot run."""

import copy
import math

import pytest
import torch

from s2d import load_model
from s2d.commands.tasks import make_task
from s2d.errors import S2DError
from s2d.quant import FakeQuantLinear, QuantConfig, QuantSpec, RangeObserver, convert_qat, prepare_qat, quantize
from s2d.quant.linear import QuantLinear
from s2d.quant.qat import calibrate_qat, static_layers
from s2d.train import TrainConfig, train

STATIC = {"a_static": True, "a_granularity": "per_tensor"}


def _config(**kw) -> TrainConfig:
    base = dict(task="image", steps=4, lr=1e-3, warmup=0, batch_size=8, eval_every=0, log_every=1,
                checkpoint_every=2, qat="W4A4", qat_options=dict(STATIC))
    base.update(kw)
    return TrainConfig(**base).validate()


def _vit(config: TrainConfig):
    model, tok = load_model("tiny:vit", head="image-classification", num_labels=10)
    return model, make_task(config, model, tok)


def _layer(learn: bool, symmetric: bool = True) -> FakeQuantLinear:
    torch.manual_seed(0)
    a_spec = QuantSpec(4, symmetric, "per_tensor")
    return FakeQuantLinear.from_linear(torch.nn.Linear(6, 3), QuantSpec(4), a_spec, a_static=True,
                                       learn_act_scale=learn)


def _loop_fake_quant(x: torch.Tensor, s: float, zero: int, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(round(x/s) + z, qmin, qmax) - z, times s, one value at a time."""
    out = torch.empty_like(x)
    flat, dst = x.reshape(-1), out.reshape(-1)
    for i in range(flat.numel()):
        q = torch.round(flat[i] / s) + zero
        dst[i] = (min(max(float(q), qmin), qmax) - zero) * s
    return out


@pytest.mark.parametrize("learn,symmetric", [(True, True), (False, True), (False, False)])
def test_static_forward_matches_a_plain_loop(learn, symmetric):
    layer = _layer(learn, symmetric)
    x = 3 * torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(1))
    calibrate_qat(layer, [{"x": x[:2]}])  # a narrower range than the whole x: some values saturate
    s = float(layer.static_act_scale().detach())
    zero = 0 if symmetric else int(layer.act_zero_point)
    spec = layer.a_spec
    expected_x = _loop_fake_quant(x, torch.tensor(s), zero, spec.qmin, spec.qmax)
    assert (expected_x.abs() < x.abs() - s).any()  # saturation happened
    with torch.no_grad():
        assert torch.equal(layer.quantize_input(x), expected_x)
        w, ws = layer.weight, layer.weight.abs().amax(1) / layer.w_spec.qmax
        wq = torch.stack([_loop_fake_quant(w[r], ws[r], 0, -8, 7) for r in range(w.shape[0])])
        torch.testing.assert_close(layer(x), expected_x @ wq.t() + layer.bias, rtol=0, atol=1e-6)


def test_scale_gradient_is_lsq():
    layer = _layer(learn=True)
    with torch.no_grad():
        layer.act_scale.fill_(0.25)
        layer.act_calibrated.fill_(True)
    x = torch.tensor([[-3.0, -1.9, -0.3, 0.0, 0.13, 0.62], [1.0, 1.74, 1.76, 2.4, 5.0, -0.88]], requires_grad=True)
    v = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    (layer.quantize_input(x) * v).sum().backward()
    # LSQ (Esser et al. 2020): d x̂/ds = round(x/s) − x/s inside the range, qmin or qmax outside, times
    # g = 1/sqrt(N·Qp); d x̂/dx = 1 inside, 0 outside.
    s, qmin, qmax = 0.25, layer.a_spec.qmin, layer.a_spec.qmax
    ds, dx = 0.0, torch.zeros_like(x)
    for i in range(2):
        for j in range(6):
            r = float(x[i, j].detach()) / s
            if r <= qmin:
                ds += float(v[i, j]) * qmin
            elif r >= qmax:
                ds += float(v[i, j]) * qmax
            else:
                ds += float(v[i, j]) * (round(r) - r)
                dx[i, j] = v[i, j]
    ds /= math.sqrt(x.numel() * qmax)
    assert layer.act_scale.grad is not None
    assert float(layer.act_scale.grad) == pytest.approx(ds, rel=1e-5, abs=1e-7)
    assert torch.equal(x.grad, dx)
    assert (dx == 0).any() and (dx != 0).any()  # both sides of the range were exercised


def test_fixed_scales_get_no_gradient_and_are_buffers():
    layer = _layer(learn=False)
    assert "act_scale" not in dict(layer.named_parameters()) and "act_scale" in dict(layer.named_buffers())


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_calibrated_scale_equals_the_observer(observer):
    config = _config(qat_options={**STATIC, "a_observer": observer})
    model, task = _vit(config)
    prepare_qat(model, config.qat_config())
    layers = static_layers(model)
    assert len(layers) == 6 * model.config.num_hidden_layers  # q, k, v, o, fc1, fc2 per block
    seen = {n: [] for n in layers}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach().clone()))
               for n, m in layers.items()]
    batches = [task.batch(0, 0, 8), task.batch(1, 0, 8)]
    scales = calibrate_qat(model, batches)
    for h in handles:
        h.remove()
    for name, layer in layers.items():
        reference = RangeObserver(layer.a_spec)
        for x in seen[name]:
            reference.update(x)
        assert float(layer.act_scale.detach()) == float(reference.qparams()[0]) == scales[name], name
    if observer == "minmax":  # the scales PTQ's static calibration (`s2d quantize`) gives on the same images
        fp, _ = _vit(config)
        calib = {"pixel_values": torch.cat([b["pixel_values"] for b in batches])}
        ptq = quantize(fp, config.qat_config(), calib=calib, progress=False)
        for name, layer in layers.items():
            assert torch.equal(ptq.get_submodule(name).act_scale, layer.act_scale.detach()), name


@pytest.mark.parametrize("fixed,symmetric", [(False, True), (True, True), (True, False)])
def test_trained_static_qat_saves_and_reloads_with_the_same_logits(tmp_path, fixed, symmetric):
    from s2d.quant import save_quantized

    config = _config(qat_fixed_act_scales=fixed, qat_options={**STATIC, "a_symmetric": symmetric})
    model, task = _vit(config)
    prepare_qat(model, config.qat_config(), learn_act_scales=not fixed)
    initial = calibrate_qat(copy.deepcopy(model), [task.batch(0, 0, 8)])  # what train() calibrates on
    train(model, task, config, tmp_path / "ckpt", progress=False)
    learned = {n: float(m.static_act_scale().detach()) for n, m in static_layers(model).items()}
    assert (learned == initial) == fixed  # learned scales moved; fixed ones did not
    pixels = task.batch(50, 0, 6)["pixel_values"]
    model.eval()
    with torch.no_grad():
        qat_logits = model(pixel_values=pixels).logits
    save_quantized(convert_qat(copy.deepcopy(model), config.qat_config()), tmp_path / "q")
    reloaded, _ = load_model(tmp_path / "q")
    layers = {n: m for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == len(learned) and all(m.a_static for m in layers.values())
    assert {n: float(m.act_scale) for n, m in layers.items()} == learned
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, qat_logits)


def test_finetune_run_folder_holds_the_learned_scales(tmp_path):
    from safetensors.torch import load_file

    from s2d.commands.finetune import finetune

    config = _config(steps=2, checkpoint_every=2)
    finetune("tiny:vit", config, tmp_path / "run", progress=False)
    final = load_file(tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors")
    integer, _ = load_model(tmp_path / "run" / "model-quantized")
    layers = {n: m for n, m in integer.named_modules() if isinstance(m, QuantLinear)}
    assert layers and all(m.a_static for m in layers.values())
    for name, layer in layers.items():
        assert float(layer.act_scale) == float(final[f"{name}.act_scale"].abs()), name
    plain, _ = load_model(tmp_path / "run" / "model")  # the float weights load as a plain model
    assert not any(isinstance(m, FakeQuantLinear | QuantLinear) for m in plain.modules())
    assert "learned (LSQ)" in (tmp_path / "run" / "report.md").read_text()


def test_resume_keeps_the_learned_scales_bitwise(tmp_path):
    config = _config()
    model_a, task_a = _vit(config)
    prepare_qat(model_a, config.qat_config())
    train(model_a, task_a, config, tmp_path / "a", progress=False)

    model_b, task_b = _vit(config)
    prepare_qat(model_b, config.qat_config())
    original = task_b.batch

    def batch(step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt
        return original(step, *args, **kwargs)
    task_b.batch = batch
    with pytest.raises(KeyboardInterrupt):
        train(model_b, task_b, config, tmp_path / "b", progress=False)
    model_c, task_c = _vit(config)
    prepare_qat(model_c, config.qat_config())
    calls = []
    real = task_c.batch
    task_c.batch = lambda step, *a, **k: calls.append(step) or real(step, *a, **k)
    result = train(model_c, task_c, config, tmp_path / "b", progress=False)
    assert result.resumed_from == 2 and 0 not in calls  # no recalibration on resume: the scales come from step 2
    for (name, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        assert torch.equal(a, c), name


def test_uncalibrated_static_layer_refuses_to_run():
    layer = _layer(learn=True)
    with pytest.raises(S2DError, match="never calibrated"):
        layer(torch.randn(2, 6))


@pytest.mark.parametrize("options,match", [
    ({"a_static": True}, "per_tensor"),  # static with the scheme's per-token activations
    ({"a_static": True, "a_granularity": "per_token"}, "per_tensor"),
    ({"method": "gptq"}, "not simulated"),
    ({"rotate": True}, "not simulated"),
])
def test_bad_qat_options_are_clear_errors(options, match):
    with pytest.raises(S2DError, match=match):
        TrainConfig(qat="W4A4", qat_options=options).validate()


def test_other_bad_settings_are_clear_errors():
    with pytest.raises(S2DError, match="need --qat"):
        TrainConfig(qat_options=dict(STATIC)).validate()
    with pytest.raises(S2DError, match="dynamic"):
        TrainConfig(qat="W4A4", qat_fixed_act_scales=True).validate()
    with pytest.raises(S2DError, match="qat_calib_steps"):
        TrainConfig(qat="W4A4", qat_options=dict(STATIC), qat_calib_steps=0).validate()
    with pytest.raises(S2DError, match="symmetric"):
        _layer(learn=True, symmetric=False)


def test_cli_flags_reach_the_config():
    from s2d.cli import build_parser, train_config

    args = build_parser().parse_args(["finetune", "m", "--qat", "W4A4", "--qat-option", "a_static=true",
                                      "--qat-option", "a_granularity=per_tensor", "--qat-fixed-act-scales",
                                      "--qat-calib-steps", "2"])
    config = train_config(args)
    assert config.qat_options == STATIC and config.qat_fixed_act_scales and config.qat_calib_steps == 2
    q = config.qat_config()
    assert (q.a_static, q.a_granularity, q.a_bits, q.w_bits) == (True, "per_tensor", 4, 4)
    assert QuantConfig.from_dict(q.to_dict()) == q
