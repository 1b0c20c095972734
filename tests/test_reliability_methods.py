"""Bad input to quantization and low-rank compression ends in one clear S2DError, raised before the work starts."""

import pytest
import torch

from s2d.assets import load_model
from s2d.cli import main
from s2d.commands.quantize import QuantRunConfig
from s2d.errors import S2DError
from s2d.lowrank import LowRankConfig, compress
from s2d.quant import QuantConfig, quantize
from s2d.quant.api import prepare_qat

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--n-samples", "4", "--seq-len", "32", "--ppl-tokens", "1024"]


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert it failed with exactly one `s2d: error:` line and no traceback; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("s2d: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the input must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("s2d.assets.load_model", refuse)
    monkeypatch.setattr("s2d.assets.models.load_model", refuse)


# -- quantize: bad options fail before any model is loaded --------------------------------------------------


@pytest.mark.parametrize("args,names", [
    (["--option", "bogus=1"], ["'bogus'", "w_group_size", "a_granularity"]),  # unknown: lists the fields it can set
    (["--option", "w_bits=abc"], ["w_bits", "--scheme"]),  # set by the scheme, never an override
    (["--option", "a_granularity=7"], ["a_granularity", "must be a string", "7"]),
    (["--option", "percentile=abc"], ["percentile", "must be a number"]),
    (["--option", "w_group_size=32"], ["w_group_size=32", "w_granularity=per_group"]),  # per_channel has no groups
    (["--option", "w_granularity=per_group"], ["positive group size", "w_group_size"]),
    (["--option", "method=gptq"], ["method", "--method"]),
    (["--smooth", "-1"], ["--smooth ALPHA", "[0, 1]", "-1"]),
    (["--scheme", "W16A8", "--method", "gptq"], ["W16A8 gptq", "GPTQ quantizes weights"]),
    (["--ppl-tokens", "0"], ["--ppl-tokens"]),
    (["--eval-seq-len", "1"], ["--seq-len"]),
    (["--limit", "0"], ["--limit"]),
])
def test_bad_quantize_options_fail_before_loading(args, names, tmp_path, capsys, no_loading):
    out = tmp_path / "run"
    line = _cli_error(capsys, ["quantize", "tiny:llama", *args, "--out", str(out)])
    for name in names:
        assert name in line
    assert not out.exists()  # not even the run folder


def test_every_scheme_and_method_cell_is_checked_up_front():
    config = QuantRunConfig(schemes=("W4A4", "W16A8"), methods=("rtn", "smooth+gptq"))
    with pytest.raises(S2DError, match="W16A8 smooth\\+gptq: GPTQ quantizes weights"):
        config.validate()
    with pytest.raises(S2DError, match="sqnr_samples"):
        QuantRunConfig(sqnr_samples=0).validate()
    with pytest.raises(S2DError, match="QuantRunConfig.n_samples must be a whole number, got '8'"):
        QuantRunConfig(n_samples="8").validate()


# -- QuantConfig itself: the Python API is as strict as the CLI -----------------------------------------------


def test_quant_config_refuses_unknown_fields_and_wrong_types():
    with pytest.raises(S2DError, match=r"unknown QuantConfig fields: \['bogus'\]; known: .*w_group_size"):
        QuantConfig.from_scheme("W4A4", bogus=1)
    with pytest.raises(S2DError, match="w_bits comes from the scheme"):
        QuantConfig.from_scheme("W4A4", w_bits=8)
    with pytest.raises(S2DError, match="QuantConfig.w_group_size must be a whole number or None, got 'abc'"):
        QuantConfig(w_granularity="per_group", w_group_size="abc")
    with pytest.raises(S2DError, match="QuantConfig.a_granularity must be a string, got 7"):
        QuantConfig(a_granularity=7)
    with pytest.raises(S2DError, match="QuantConfig.rotate must be true or false"):
        QuantConfig(rotate="yes")
    assert QuantConfig(percentile=99).percentile == 99  # an int is a fine float


# -- group sizes: checked against the model's Linears before any calibration or GPTQ work --------------------


def test_a_group_that_does_not_divide_a_linear_names_it_before_gptq_runs(monkeypatch):
    def no_gptq(*args, **kwargs):
        raise AssertionError("GPTQ ran before the group size was checked")

    monkeypatch.setattr("s2d.quant.api.gptq_model", no_gptq)
    model, _ = load_model("tiny:llama")  # Linear input sizes 64 (q..up) and 128 (down)
    config = QuantConfig.from_scheme("W4A16", method="gptq", w_granularity="per_group", w_group_size=48)
    with pytest.raises(S2DError, match=r"w_group_size=48 does not divide the input size 64 of "
                                       r"model\.layers\.0\.self_attn\.q_proj.*w_group_size=32"):
        quantize(model, config, calib=torch.randint(0, 100, (2, 8)), progress=False)
    with pytest.raises(S2DError, match="w_group_size=48 does not divide"):
        prepare_qat(model, config)
    assert not any(type(m).__name__ == "FakeQuantLinear" for m in model.modules())  # nothing was swapped


def test_the_group_check_sees_the_rank_inside_a_low_rank_pair():
    model, _ = load_model("tiny:llama")
    compress(model, LowRankConfig(method="svd", keep=None, ranks={"q": 12}), progress=False)
    config = QuantConfig.from_scheme("W4A16", w_granularity="per_group", w_group_size=32)
    with pytest.raises(S2DError, match=r"input size 12 of model\.layers\.0\.self_attn\.q_proj\.B.*w_group_size=4"):
        quantize(model, config, progress=False)


def test_cli_group_size_error_names_the_linear_before_any_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    line = _cli_error(capsys, ["quantize", "tiny:llama", "--scheme", "W4A16", "--option", "w_granularity=per_group",
                               "--option", "w_group_size=48", "--eval", "ppl:wiki", *SMALL, "--out", str(out)])
    assert "model.layers.0.self_attn.q_proj" in line and "64" in line and "w_group_size=32" in line
    assert not out.exists()  # nothing was evaluated or written: the failed run leaves no folder


# -- low rank: non-finite weights and statistics are named; ranks and keep out of range -----------------------


def _nan_model(where: str):
    model, _ = load_model("tiny:llama")
    with torch.no_grad():
        if where == "weight":
            model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
        else:  # the token every calibration position uses embeds to NaN: activations are NaN from the start
            model.model.embed_tokens.weight[7, 2] = float("inf")
    return model


@pytest.mark.parametrize("method", ["svd", "asvd", "rom"])
@pytest.mark.parametrize("sequential", [True, False])
def test_a_nan_weight_is_named_not_a_linalg_error(method, sequential):
    config = LowRankConfig(method=method, keep=0.8, schedule="uniform", sequential=sequential)
    with pytest.raises(S2DError, match=r"the weight of model\.layers\.0\.mlp\.down_proj holds NaN or Inf"):
        compress(_nan_model("weight"), config, calib=torch.randint(0, 100, (2, 8)), progress=False)


@pytest.mark.parametrize("method", ["asvd", "rom"])
def test_non_finite_calibration_activations_are_named(method):
    config = LowRankConfig(method=method, keep=0.8, schedule="uniform")
    with pytest.raises(S2DError, match=r"calibration activations reaching model\.layers\.0\.self_attn\.q_proj hold "
                                       r"NaN or Inf.*method='svd'"):
        compress(_nan_model("activations"), config, calib=torch.full((2, 8), 7), progress=False)


def test_statistics_with_a_nan_are_caught_in_the_low_level_api_too():
    from s2d.lowrank.asvd import InputGram, asvd_factors
    from s2d.lowrank.rom import GramOutputStats, OutputStats, rom_factors

    x = torch.randn(10, 6, dtype=torch.float64)
    x[4, 1] = float("nan")
    gram, out = InputGram(6), OutputStats(4)
    gram.update(x)
    out.update(x[:, :4])
    weight = torch.randn(4, 6)
    with pytest.raises(S2DError, match="reaching blocks.2.fc hold NaN"):
        asvd_factors(weight, None, gram, name="blocks.2.fc")
    with pytest.raises(S2DError, match="reaching blocks.2.fc hold NaN"):
        rom_factors(weight, None, out, name="blocks.2.fc")
    with pytest.raises(S2DError, match="hold NaN"):
        GramOutputStats(gram, weight, None)


@pytest.mark.parametrize("ranks,match", [
    ({"q": 10_000}, r"rank 10000 for model\.layers\.0\.self_attn\.q_proj \(64x64\) must be an integer in 1\.\.64"),
    ({"q": 0}, "ranks must be whole numbers ≥ 1"),
    ({"down": -3}, "ranks must be whole numbers ≥ 1"),
    ({"q": "abc"}, "ranks must be whole numbers ≥ 1"),
    ({"q": 2.5}, "ranks must be whole numbers ≥ 1"),
])
def test_impossible_ranks_are_refused(ranks, match):
    model, _ = load_model("tiny:llama")
    with pytest.raises(S2DError, match=match):
        compress(model, LowRankConfig(method="svd", keep=None, ranks=ranks), progress=False)


@pytest.mark.parametrize("keep,match", [
    (0.01, r"keep=0\.01 is out of reach: rank 1 in every targeted Linear still leaves"),
    (0.0, r"keep must be a fraction in \(0, 1\]"),
    (1.5, r"keep must be a fraction in \(0, 1\]"),
    ("abc", r"keep must be a fraction in \(0, 1\].*'abc'"),
])
def test_keep_out_of_reach_is_refused(keep, match):
    model, _ = load_model("tiny:llama")
    with pytest.raises(S2DError, match=match):
        compress(model, LowRankConfig(method="svd", keep=keep), progress=False)


# -- falsy values: an explicit empty block size is a block size ------------------------------------------------


def test_an_explicit_empty_block_size_is_used_not_replaced():
    from s2d.quant.primitives import QuantSpec, choose_qparams, dequantize_affine, quantize_affine

    spec = QuantSpec(8, granularity="per_channel")  # its own block size needs a last dimension; a 0-d tensor has none
    x = torch.tensor(0.5)
    scale, zero = choose_qparams(x, spec, ())
    q = quantize_affine(x, scale, zero, spec, ())
    assert q.item() == 127 and dequantize_affine(q, scale, zero, ()).item() == pytest.approx(0.5)
