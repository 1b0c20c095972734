"""Mixed precision: per-role / per-Linear schemes, average bits, and the sensitivity-driven allocation."""

import copy
import dataclasses
import json
import re

import pytest
import torch

from s2d.arch import describe
from s2d.assets.tiny import tiny_model
from s2d.errors import S2DError
from s2d.quant import QuantConfig, QuantLinear, quantize, quantized_layers
from s2d.quant.mixed import allocate, average_bits, choose, measure_sensitivity, raise_fraction, resolve
from s2d.quant.swap import set_module

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny llama: per block q 64x64, k and v 32x64, o 64x64, gate and up 128x64, down 64x128; three blocks
SIZES = {"q": 4096, "k": 2048, "v": 2048, "o": 4096, "gate": 8192, "up": 8192, "down": 8192}
TOTAL = 3 * sum(SIZES.values())
GAIN = 20.0


def _tokens(n=2, seq=24, seed=0):
    return torch.randint(0, 250, (n, seq), generator=torch.Generator().manual_seed(seed))


def _bits(layer):
    return (layer.w_spec and layer.w_spec.bits, layer.a_spec and layer.a_spec.bits)


@pytest.mark.parametrize("family,role", [("llama", "down"), ("qwen2", "k"), ("bert", "fc2")])
def test_a_role_override_gives_exactly_those_linears_its_bits(family, role):
    model, _ = tiny_model(family)
    config = QuantConfig.from_scheme("W4A4", a_symmetric=False, a_clip=0.9, grid="full",
                                     layer_schemes={role: "W8A16"})
    roles = {lin.name: lin.role for lin in describe(model).linears()}
    quantize(model, config)
    layers = quantized_layers(model)
    assert set(layers) == set(roles)
    for name, layer in layers.items():
        if roles[name] == role:  # the scheme's bits, every other setting the config's
            assert layer.w_spec == dataclasses.replace(config.weight_spec(), bits=8) and layer.a_spec is None
        else:
            assert layer.w_spec == config.weight_spec() and layer.a_spec == config.act_spec()


def test_globs_match_linear_names_and_later_patterns_win():
    model, _ = tiny_model("llama")
    config = QuantConfig.from_scheme("W4A4", layer_schemes={"model.layers.0.*": "W8A8", "*.mlp.down_proj": "W4A16",
                                                            "q": "W6A6"})
    specs = {n: (w and w.bits, a and a.bits) for n, (w, a) in resolve(model, config).items()}
    assert specs["model.layers.0.self_attn.k_proj"] == (8, 8)
    assert specs["model.layers.0.mlp.down_proj"] == (4, None)  # the down glob comes after the block glob
    assert specs["model.layers.0.self_attn.q_proj"] == specs["model.layers.2.self_attn.q_proj"] == (6, 6)
    assert specs["model.layers.1.mlp.down_proj"] == (4, None)
    assert specs["model.layers.1.self_attn.k_proj"] == (4, 4)
    swapped = QuantConfig.from_scheme("W4A4", layer_schemes={"*.mlp.down_proj": "W4A16", "model.layers.0.*": "W8A8"})
    assert resolve(model, swapped)["model.layers.0.mlp.down_proj"][1].bits == 8


@pytest.mark.parametrize("family,pattern,roles", [("llama", "dwn", "q, k, v, o, gate, up, down"),
                                                  ("llama", "model.layers.9.*", "gate"),
                                                  ("bert", "gate", "q, k, v, o, fc1, fc2")])
def test_a_pattern_matching_no_linear_is_an_error_listing_the_roles(family, pattern, roles):
    model, _ = tiny_model(family)
    with pytest.raises(S2DError, match=f"{re.escape(repr(pattern))} matches none.*{roles}"):
        quantize(model, QuantConfig.from_scheme("W4A4", layer_schemes={pattern: "W4A8"}))
    assert not quantized_layers(model)  # refused before anything was swapped


def test_a_layer_scheme_cannot_set_kv_bits():
    with pytest.raises(S2DError, match="KV-cache bits"):
        QuantConfig.from_scheme("W4A4", layer_schemes={"down": "W4A8KV4"})


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_mixed_rtn_equals_each_linear_quantized_by_hand(family):
    settings = dict(a_symmetric=False, a_clip=0.9, grid="full", w_observer="mse")
    model, _ = tiny_model(family)
    last = "down" if family == "llama" else "fc2"

    def by_hand(lin):  # the same rules, written as a plain loop
        if lin.role == "q":
            return "W6A6"
        if lin.role == last:
            return "W4A16"
        return "W8A8" if lin.block == 0 else "W4A4"

    reference = copy.deepcopy(model)
    for lin in describe(reference).linears():
        cfg = QuantConfig.from_scheme(by_hand(lin), **settings)
        set_module(reference, lin.name, QuantLinear.from_linear(lin.module, cfg.weight_spec(), cfg.act_spec()))
    prefix = describe(model).blocks[0].name
    config = QuantConfig.from_scheme("W4A4", **settings,
                                     layer_schemes={f"{prefix}.*": "W8A8", "q": "W6A6", last: "W4A16"})
    quantize(model, config)
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reference(input_ids=x).logits)


def test_gptq_with_mixed_weight_bits_keeps_each_layers_codes_in_its_own_range():
    model, _ = tiny_model("llama")
    fp_o = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    config = QuantConfig.from_scheme("W4A8", method="gptq", grid="full",
                                     layer_schemes={"down": "W8A8", "model.layers.0.*": "W3A8", "o": "W16A8"})
    x = _tokens(4, 32)
    rtn = quantize(copy.deepcopy(model), dataclasses.replace(config, method="rtn"))
    quantize(model, config, calib=x, progress=False)
    layers = quantized_layers(model)
    for name, layer in layers.items():
        if name.endswith("o_proj"):  # W16: floating-point weights, untouched
            assert layer.w_spec is None
            if ".1." in name:
                assert torch.equal(layer.weight, fp_o)
            continue
        bits = 3 if name.startswith("model.layers.0.") else 8 if name.endswith("down_proj") else 4  # later wins
        spec = layer.w_spec
        assert spec.bits == bits, name
        assert spec.qmin <= int(layer.qweight.min()) and int(layer.qweight.max()) <= spec.qmax, name
        if bits == 8:  # its codes need more than a 4-bit range, so they really are 8-bit codes
            assert int(layer.qweight.abs().max()) > 8
    down = "model.layers.1.mlp.down_proj"
    assert not torch.equal(layers[down].qweight, quantized_layers(rtn)[down].qweight)  # GPTQ rounded it
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=x).logits).all()


@pytest.mark.parametrize("method,extra", [("rtn", {}), ("gptq", {"a_static": True, "a_granularity": "per_tensor"})])
def test_a_mixed_model_reloads_identically(tmp_path, method, extra):
    from s2d import load_model
    from s2d.quant import save_quantized

    model, tok = load_model("tiny:llama")
    config = QuantConfig.from_scheme("W4A8", method=method, **extra,
                                     layer_schemes={"down": "W8A16", "model.layers.1.*": "W4A4", "o": "W16A8"})
    x = _tokens()
    quantize(model, config, calib=x, progress=False)
    with torch.no_grad():
        before = model(input_ids=x).logits
    save_quantized(model, tmp_path / "q", tok, config)
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert block["format_version"] == 2 and block["config"]["layer_schemes"] == config.layer_schemes
    again, _ = load_model(tmp_path / "q")
    assert {n: _bits(m) for n, m in quantized_layers(again).items()} == \
        {n: _bits(m) for n, m in quantized_layers(model).items()}
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, before)


def test_a_folder_from_before_mixed_precision_still_loads(tmp_path):
    from s2d import load_model
    from s2d.quant import save_quantized

    model, tok = load_model("tiny:llama")
    quantize(model, QuantConfig.from_scheme("W4A8"))
    save_quantized(model, tmp_path / "q", tok)
    path = tmp_path / "q" / "config.json"
    cfg = json.loads(path.read_text())
    assert cfg["quantization"]["format_version"] == 1  # a uniform folder stays readable by older s2d
    for entry in cfg["quantization"]["layers"].values():  # as version 1 wrote them
        del entry["w_bits"], entry["a_bits"]
    del cfg["quantization"]["config"]["layer_schemes"]
    path.write_text(json.dumps(cfg))
    again, _ = load_model(tmp_path / "q")
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)


def test_average_bits_against_a_hand_count():
    model, _ = tiny_model("llama")
    config = QuantConfig.from_scheme("W4A4", layer_schemes={"down": "W8A8", "model.layers.0.self_attn.q_proj": "W4A16"})
    w = 4 + (8 - 4) * 3 * SIZES["down"] / TOTAL
    a = 4 + ((8 - 4) * 3 * SIZES["down"] + (16 - 4) * SIZES["q"]) / TOTAL
    assert average_bits(model, resolve(model, config)) == pytest.approx({"w": w, "a": a})
    quantize(model, config)
    assert average_bits(model) == pytest.approx({"w": w, "a": a})


def test_the_budget_fraction_bounds_every_side_that_changes():
    assert raise_fraction("W4A4", "W4A8", 5) == pytest.approx(0.25)
    assert raise_fraction("W4A4", "W8A8", 5) == pytest.approx(0.25)
    assert raise_fraction("W4A4", "W8A6", 5) == pytest.approx(0.25)  # the weights bind before the inputs
    assert raise_fraction("W4A8", "W8A8", 6) == pytest.approx(0.5)  # A8 is spent already; only weights count
    assert raise_fraction("W4A4", "W4A8", 9) == 1.0
    assert raise_fraction("W4A4", "W4A16", 10) == pytest.approx(0.5)  # FP inputs count as 16 bits
    for base, high, budget, match in [("W4A4", "W4A4", 5, "must raise"), ("W4A8", "W8A4", 6, "must raise"),
                                      ("W4A4", "W4A8", 3.5, "below"), ("W4A4", "W4A8KV4", 5, "KV-cache")]:
        with pytest.raises(S2DError, match=match):
            raise_fraction(base, high, budget)


def test_the_greedy_takes_density_order_and_its_sets_are_nested():
    sizes = {"a": 10, "b": 1, "c": 5, "d": 1}
    gains = {"a": 50.0, "b": 1.0, "c": 1.0, "d": 3.0}  # per parameter: a 5, d 3, b 1, c 0.2
    assert choose(gains, sizes, 10 / 17) == ["a"]
    assert choose(gains, sizes, 11 / 17) == ["a", "d"]
    picks = [choose(gains, sizes, f / 17) for f in range(18)]
    for smaller, larger in zip(picks, picks[1:], strict=False):
        assert larger[: len(smaller)] == smaller  # a larger budget raises a superset
    assert picks[0] == [] and set(picks[-1]) == set(sizes)


def _planted(factor=30.0, gain=GAIN, block=1, channel=5):
    """Tiny llama with one massive channel in block 1's down_proj input: up's output channel scaled by `factor`,
    down's matching input column by 1/factor (function-preserving), so A4 rounds every other channel of those
    inputs to zero while A8 keeps them; and that down_proj's weight times `gain`, so its output (and its error)
    dominates the residual stream where a random model's layers barely move the logits."""
    model, _ = tiny_model("llama")
    mlp = model.model.layers[block].mlp
    with torch.no_grad():
        mlp.up_proj.weight[channel] *= factor
        mlp.down_proj.weight[:, channel] /= factor
        mlp.down_proj.weight *= gain
    return model, f"model.layers.{block}.mlp.down_proj"


def _kl(model, quantized, x):
    with torch.no_grad():
        p, r = quantized(input_ids=x).logits.log_softmax(-1), model(input_ids=x).logits.log_softmax(-1)
    return float(torch.nn.functional.kl_div(p.flatten(0, 1), r.flatten(0, 1), log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("extra,high", [({}, "W8A8"), ({"a_static": True, "a_granularity": "per_tensor"}, "W4A8")])
def test_each_measured_gain_is_that_of_the_model_quantize_builds(extra, high):
    """The base KL and a Linear's gain are those of the real RTN models: all at base, and that Linear raised
    (static scales calibrated as convert calibrates them; exact when the weights keep their bits)."""
    model, _ = tiny_model("llama")
    x = _tokens(4, 32)
    config = QuantConfig.from_scheme("W4A4", **extra)
    base_kl, gains = measure_sensitivity(model, config, high, x, progress=False)
    assert base_kl == pytest.approx(_kl(model, quantize(copy.deepcopy(model), config, calib=x), x), rel=1e-5)
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.2.mlp.down_proj"):
        raised = quantize(copy.deepcopy(model), dataclasses.replace(config, layer_schemes={name: high}), calib=x)
        assert gains[name] == pytest.approx(base_kl - _kl(model, raised, x), rel=1e-4, abs=1e-9)


def test_the_allocation_raises_a_planted_sensitive_layer_first():
    model, planted = _planted()
    x = _tokens(4, 32)
    with torch.no_grad():  # the outlier channel alone is function-preserving
        assert torch.allclose(model(input_ids=x).logits, _planted(factor=1.0)[0](input_ids=x).logits, atol=1e-4)
    config = QuantConfig.from_scheme("W4A4")
    one_down = 4 + 4 * SIZES["down"] / TOTAL  # the budget of raising exactly one down_proj
    result = allocate(model, config, "W4A8", one_down, x, progress=False)
    assert result.layer_schemes == {planted: "W4A8"}
    assert result.average_bits == pytest.approx({"w": 4.0, "a": one_down})
    assert max(result.sensitivity, key=result.sensitivity.get) == planted
    assert result.sensitivity[planted] > 0.5 * result.base_kl  # most of the damage was that one layer's inputs
    assert quantized_layers(model) == {}  # the measurement quantized a copy


def test_larger_budgets_raise_supersets_within_the_budget_and_lower_the_loss():
    model, _ = _planted()
    x = _tokens(4, 32)
    config = QuantConfig.from_scheme("W4A4")
    measured = measure_sensitivity(model, config, "W4A8", x, progress=False)
    assert len(measured[1]) == 21
    budgets = [4, 4.3, 4.5, 5, 6, 8]  # 4.3: just room for one down_proj (4.296)
    results = [allocate(model, config, "W4A8", b, None, measured=measured) for b in budgets]
    for budget, result in zip(budgets, results, strict=True):
        assert result.average_bits["a"] <= budget + 1e-9 and result.average_bits["w"] == 4
    chosen = [set(r.layer_schemes) for r in results]
    assert chosen[0] == set() and len(chosen[-1]) == 21
    assert all(a <= b for a, b in zip(chosen, chosen[1:], strict=False))

    # the calibration loss of the model each allocation asks for
    losses = [_kl(model, quantize(copy.deepcopy(model), dataclasses.replace(config, layer_schemes=r.layer_schemes)), x)
              for r in results[:4]]
    assert losses[0] > losses[1] > losses[3]  # the planted layer is raised at 4.3 already


def test_the_allocation_measures_an_encoder_and_refuses_hand_schemes():
    model, _ = tiny_model("bert")
    x = _tokens(4, 16)
    result = allocate(model, QuantConfig.from_scheme("W4A4"), "W8A8", 5, x, progress=False)
    assert len(result.sensitivity) == 18 and result.average_bits["w"] <= 5 and result.average_bits["a"] <= 5
    with pytest.raises(S2DError, match="one base scheme"):
        allocate(model, QuantConfig.from_scheme("W4A4", layer_schemes={"q": "W4A8"}), "W4A8", 5, x)
    with pytest.raises(S2DError, match="calibration data"):
        allocate(model, QuantConfig.from_scheme("W4A4"), "W4A8", 5, None)


def test_quantize_cli_allocates_records_and_saves_the_mixed_model(tmp_path):
    from s2d import load_model
    from s2d.cli import main

    out = tmp_path / "4.5"  # named as bench/mixed_precision.py names a budget's run folder
    argv = ["quantize", "tiny:llama", "--scheme", "W4A4", "--avg-bits", "4.5", "--high-scheme", "W4A8",
            "--sensitivity-samples", "2", "--sensitivity-seq-len", "16", "--n-samples", "4", "--seq-len", "32",
            "--ppl-tokens", "1024", "--out", str(out)]
    assert main(argv) == 0
    entry = json.loads((out / "metrics.json").read_text())["results"]["W4A4 rtn"]
    mixed = entry["mixed"]
    assert len(mixed["sensitivity"]) == 21 and mixed["layer_schemes"]
    assert entry["config"]["layer_schemes"] == mixed["layer_schemes"]
    assert entry["average_bits"] == mixed["average_bits"] and 4 < entry["average_bits"]["a"] <= 4.5
    model, _ = load_model(out / "model")
    for name, layer in quantized_layers(model).items():
        assert _bits(layer) == ((4, 8) if name in mixed["layer_schemes"] else (4, 4))
    _bench_reads_the_run(tmp_path, entry)


def _bench_reads_the_run(root, entry):
    """bench/mixed_precision.py --table on that folder: its row, the unfinished budget, the JSON and the figure."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "mixed_precision.py"
    spec = importlib.util.spec_from_file_location("mixed_precision_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--root", str(root), "--budgets", "4.5", "5", "--table", "--json", str(root / "out.json"), "--figure",
            str(root / "fig.png")]
    bench.main(args)
    cells = json.loads((root / "out.json").read_text())["budgets"]
    assert list(cells) == ["4.5"] and cells["4.5"]["ppl"] == entry["eval"]["ppl:wiki@128"]["ppl"]
    assert cells["4.5"]["raised"] == len(entry["mixed"]["layer_schemes"]) and cells["4.5"]["linears"] == 21
    assert (root / "fig.png").stat().st_size > 0
    assert "--avg-bits 5 --high-scheme W4A8 --recipe best" in " ".join(bench.command(5.0, bench.parse(args)))
    from s2d.experiments.mixed_precision import table

    text = table(root, [4.5, 5])
    assert f"| 4.5 | 4.00 | {entry['average_bits']['a']:.2f} |" in text and "Not finished" in text and ": 5." in text


def test_layer_scheme_flags_keep_their_order_and_exclude_avg_bits(tmp_path, capsys):
    from s2d.cli import build_parser, main, quant_run_config

    args = build_parser().parse_args(["quantize", "m", "--layer-scheme", "down=W4A8", "--layer-scheme",
                                      "model.layers.0.*=W8A8", "--layer-scheme", "down=W6A6"])
    schemes = quant_run_config(args).overrides["layer_schemes"]
    assert list(schemes.items()) == [("model.layers.0.*", "W8A8"), ("down", "W6A6")]  # the last one given wins
    base = ["quantize", "tiny:llama", "--out", str(tmp_path / "x")]
    assert main([*base, "--avg-bits", "5", "--layer-scheme", "down=W4A8"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--scheme", "W4A4", "--avg-bits", "3"]) == 2
    assert "below" in capsys.readouterr().err
    assert main([*base, "--layer-scheme", "down=8"]) == 2
    assert "W4A8" in capsys.readouterr().err
