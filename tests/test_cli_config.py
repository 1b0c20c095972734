"""The CLI is made from the config dataclasses: no flag restates a default, and a flag reaches its field."""

import dataclasses

import pytest

from s2d.cli import (
    DIAGNOSE_FLAGS,
    EVAL_FLAGS,
    EXPORT_FLAGS,
    LOWRANK_FLAGS,
    QUANT_FLAGS,
    TRAIN_FLAGS,
    build_parser,
    diagnose_config,
    eval_config,
    export_config,
    lowrank_config,
    quant_run_config,
    train_config,
)
from s2d.commands.quantize import SWEEP_METHODS, SWEEP_SCHEMES, QuantMethod, QuantRunConfig
from s2d.diagnose import DiagnoseConfig
from s2d.errors import S2DError
from s2d.eval.suite import EvalConfig
from s2d.export.gguf import ExportConfig
from s2d.lowrank import LowRankConfig
from s2d.train import TrainConfig

BUILDERS = {"finetune": (train_config, TrainConfig), "eval": (eval_config, EvalConfig),
            "compress": (lowrank_config, LowRankConfig), "quantize": (quant_run_config, QuantRunConfig),
            "diagnose": (diagnose_config, DiagnoseConfig), "compare": (diagnose_config, DiagnoseConfig),
            "export": (export_config, ExportConfig)}
FLAGS = {"finetune": TRAIN_FLAGS, "eval": EVAL_FLAGS, "compress": LOWRANK_FLAGS, "quantize": QUANT_FLAGS,
         "diagnose": DIAGNOSE_FLAGS, "compare": DIAGNOSE_FLAGS, "export": EXPORT_FLAGS}


def _args(*argv):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", BUILDERS)
def test_every_cli_default_is_its_config_fields_default(command):
    build, cls = BUILDERS[command]
    models = ["tiny:llama", "tiny:bert"] if command == "compare" else ["tiny:llama"]
    assert build(_args(command, *models)) == cls()


@pytest.mark.parametrize("command", BUILDERS)
def test_no_generated_flag_carries_a_default_of_its_own(command):
    """argparse defaults are None (not given) for every config flag, so the dataclass is the one source."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    fields = {f.name for f in dataclasses.fields(BUILDERS[command][1])}
    assert set(FLAGS[command]) <= fields
    generated = [a for a in sub._actions if a.dest in FLAGS[command]]
    assert len(generated) == len(FLAGS[command]) and all(a.default is None for a in generated)
    for action in generated:  # and the help shows the field's default
        assert "(default: " in action.help


def test_flags_reach_their_fields():
    config = train_config(_args("finetune", "m", "--steps", "7", "--lr", "1e-3", "--reg", "s2d", "--reg-option",
                                "lam=2", "--qat-learn-scales"))
    assert (config.steps, config.lr, config.reg, config.reg_config, config.qat_learn_scales) == \
        (7, 1e-3, "s2d", {"lam": 2}, True)
    ev = eval_config(_args("eval", "m", "--seq-len", "64,128", "--tasks", "polarity", "--limit", "3"))
    assert (ev.seq_lens, ev.tasks, ev.limit) == ((64, 128), ("polarity",), 3)
    lr = lowrank_config(_args("compress", "m", "--ranks", "q=8", "--method", "svd"))
    assert (lr.keep, lr.ranks, lr.method) == (None, {"q": 8}, "svd")
    assert lowrank_config(_args("compress", "m", "--ranks", "q=8", "--keep", "0.9")).keep == 0.9


def test_quantize_builds_one_typed_method_or_the_sweep():
    one = quant_run_config(_args("quantize", "m", "--method", "gptq", "--smooth", "0.7", "--scheme", "W4A8"))
    assert (one.schemes, one.methods, one.smooth_alpha) == (("W4A8",), ("smooth+gptq",), 0.7)
    assert quant_run_config(_args("quantize", "m", "--rotate")).methods == ("rotate+rtn",)
    sweep = quant_run_config(_args("quantize", "m", "--sweep"))
    assert (sweep.schemes, sweep.methods) == (SWEEP_SCHEMES, SWEEP_METHODS)
    with pytest.raises(S2DError, match="--smooth or --rotate"):
        quant_run_config(_args("quantize", "m", "--rotate", "--smooth", "0.5"))


@pytest.mark.parametrize("label", ["rtn", "gptq", "smooth+rtn", "rotate+gptq"])
def test_a_method_label_round_trips(label):
    assert QuantMethod.parse(label).label == label


@pytest.mark.parametrize("label", ["awq", "smooth+rotate+gptq", "twist+rtn"])
def test_a_bad_method_label_is_refused(label):
    with pytest.raises(S2DError, match="method"):
        QuantMethod.parse(label)


def test_a_regularizer_option_is_validated_before_anything_loads():
    with pytest.raises(S2DError, match="unknown S2DConfig fields"):
        train_config(_args("finetune", "m", "--reg", "s2d", "--reg-option", "lamda=1"))
    with pytest.raises(S2DError, match="takes no options"):
        train_config(_args("finetune", "m", "--reg-option", "lam=1"))
