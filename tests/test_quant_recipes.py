"""Named recipes: each file is a valid config, `--recipe` runs it and saves it, and misuse is refused."""

import json

import pytest
import yaml

from s2d.cli import main
from s2d.commands.quantize import QuantRunConfig
from s2d.errors import S2DError
from s2d.quant.config import QuantConfig
from s2d.quant.recipes import recipe, recipe_fields, recipe_names, recipe_text

SMALL = ["--n-samples", "4", "--seq-len", "32", "--ppl-tokens", "512"]


def test_the_named_recipes_exist_and_each_is_a_valid_config():
    assert {"quarot", "spinquant", "best", "norotate"} <= set(recipe_names())
    for name in recipe_names():
        data = recipe(name)
        assert data["description"] and isinstance(data["needs_rotation"], bool)
        assert data["needs_rotation"] == bool(data["config"].get("rotate", False)), name
        for scheme in ("W4A4", "W4A4KV4", "W4A8", "W6A6"):
            config = QuantConfig.from_scheme(scheme, **recipe_fields(name, kv="KV" in scheme))
            assert config.method == data["config"]["method"]
        assert yaml.safe_load(recipe_text(name))["config"] == data["config"]


def test_kv_fields_apply_only_when_the_scheme_quantizes_the_cache():
    plain = QuantRunConfig(schemes=("W4A4",), methods=("quarot",)).validate().quant_config("W4A4", "quarot")
    kv = QuantRunConfig(schemes=("W4A4KV4",), methods=("quarot",)).validate().quant_config("W4A4KV4", "quarot")
    assert (plain.rotate_qk, plain.kv_bits, plain.kv_clip) == (False, None, 1.0)
    assert (kv.rotate_qk, kv.kv_bits, kv.kv_clip) == (True, 4, 0.95)
    assert plain.a_clip == 0.9 and plain.method == "gptq" and plain.rotate


def test_recipe_run_saves_the_recipe_and_options_override_it(tmp_path):
    out = tmp_path / "r"
    argv = ["quantize", "tiny:llama", "--recipe", "quarot", "--scheme", "W4A8", "--option", "a_clip=0.8", *SMALL,
            "--no-model", "--out", str(out)]
    assert main(argv) == 0
    entry = json.loads((out / "metrics.json").read_text())["results"]["W4A8 quarot"]
    assert entry["config"]["rotate"] and entry["config"]["method"] == "gptq" and entry["config"]["w_observer"] == "mse"
    assert entry["config"]["a_clip"] == 0.8  # --option wins over the recipe's 0.9
    assert (out / "recipe-quarot.yaml").read_text() == recipe_text("quarot")


def test_a_rotating_recipe_on_a_post_norm_family_names_the_one_that_fits(tmp_path, capsys):
    code = main(["quantize", "tiny:bert", "--recipe", "best", *SMALL, "--out", str(tmp_path / "b")])
    assert code == 2
    err = capsys.readouterr().err
    assert "recipe 'best' rotates" in err and "--recipe norotate" in err
    # norotate fits (s2d quantize evaluates causal LMs only, so the encoder is quantized through the API)
    import torch

    from s2d.assets.tiny import tiny_model
    from s2d.commands.quantize import check_recipe
    from s2d.quant import quantize, quantized_layers

    model, _ = tiny_model("bert")
    check_recipe(model, "norotate")
    config = QuantRunConfig(methods=("norotate",)).validate().quant_config("W4A4", "norotate")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, config, calib=calib, progress=False)
    layers = quantized_layers(model)
    assert layers and all(m.a_spec.group_size == 32 and not m.a_spec.symmetric for m in layers.values())


def test_bad_recipe_input_is_refused(capsys):
    with pytest.raises(S2DError, match="unknown method 'bogus'"):
        QuantRunConfig(methods=("bogus",)).validate()
    with pytest.raises(S2DError, match="unknown recipe"):
        recipe("bogus")
    assert main(["quantize", "tiny:llama", "--recipe", "best", "--method", "gptq"]) == 2
    assert "--recipe best sets the method" in capsys.readouterr().err
    with pytest.raises(S2DError, match="positive group size: set a_group_size"):
        QuantConfig.from_scheme("W4A4", **{**recipe_fields("best", kv=False), "a_group_size": 0})
    from s2d.assets.tiny import tiny_model
    from s2d.quant.api import check_quantizable

    with pytest.raises(S2DError, match="a_group_size=48 does not divide"):  # tiny llama's Linears read 64 or 128
        check_quantizable(tiny_model("llama")[0],
                          QuantConfig.from_scheme("W4A4", **{**recipe_fields("best", kv=False), "a_group_size": 48}))
