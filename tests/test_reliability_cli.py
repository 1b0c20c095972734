"""Bad input through the CLI: untrusted folders, damaged files, NaN weights, silent accepts and run folders.

Every case asserts the contract: exit code 2, one `s2d: error:` line that says what to do, no traceback, and
what is left on disk. (Fault injection, full disks, concurrency and Ctrl-C: test_reliability_faults.py;
quantize/lowrank options: test_reliability_methods.py; training: test_reliability_train.py.)
"""

import json
import os
import shutil

import pytest
import torch
from reliability import (
    QUICK,
    WRITES_RUN,
    add_custom_code,
    add_tensor,
    argv,
    drop_tensor,
    edit_json,
    poison,
    refused,
    s2d_process,
    save_tiny,
)

from s2d import load_model
from s2d.cli import main
from s2d.errors import S2DError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def _copy(folder, tmp_path, name="model"):
    return shutil.copytree(folder, tmp_path / name)


# -- 1. custom code never runs without consent -------------------------------------------------------------


@pytest.mark.parametrize("config_needs_it", [False, True], ids=["custom-tokenizer", "custom-config"])
@pytest.mark.parametrize("command", [*QUICK, "compare"])
def test_custom_code_is_never_run_without_the_flag(tiny_folder, tmp_path, capsys, monkeypatch, command,
                                                   config_needs_it):
    import io

    marker = tmp_path / "ran"
    folder = add_custom_code(_copy(tiny_folder, tmp_path), marker, config_needs_it)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # what a user answering transformers' prompt types
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    out = tmp_path / "run" if command != "info" else None
    if command == "compress" and not config_needs_it:
        # svd needs no tokenizer, so the built-in config and weights are enough: it runs, the custom code does not
        assert main(argv(command, folder, out, "--method", "svd")) == 0
        assert not marker.exists()
        return
    line = refused(argv(command, folder, out), capsys)
    assert "--trust-remote-code" in line and "auto_map" not in line  # names the flag and the classes, not jargon
    assert "tokenization_custom.CustomTokenizer" in line or "configuration_custom.CustomConfig" in line
    assert not marker.exists()
    assert out is None or not out.exists()  # the refused run leaves no folder behind


def test_a_real_prompt_answered_yes_still_runs_nothing(tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    folder = add_custom_code(_copy(tiny_folder, tmp_path), marker, config_needs_it=False)
    done = s2d_process(["info", str(folder)], stdin="y\ny\ny\n",
                       env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--trust-remote-code" in done.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_the_flag_does_reach_the_loader(tiny_folder, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    folder = add_custom_code(_copy(tiny_folder, tmp_path), marker, config_needs_it=False)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    assert main(["info", str(folder), "--trust-remote-code"]) == 0
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
@pytest.mark.parametrize("command", ["info", "eval", "compress"])
def test_pickle_weights_are_refused_with_how_to_convert(tiny_folder, tmp_path, capsys, name, command):
    folder = _copy(tiny_folder, tmp_path)
    model, _ = load_model(folder)
    torch.save(model.state_dict(), folder / name)
    (folder / "model.safetensors").unlink()
    line = refused(argv(command, folder, tmp_path / "run" if command != "info" else None), capsys)
    assert name in line and "safetensors" in line and "save_pretrained" in line


def test_the_python_api_refuses_too(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(S2DError, match="corrupt"):
        load_model(folder)


# -- 2. damaged files are an S2DError, never a traceback ---------------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path):
    path.write_bytes(b"not a safetensors file at all" * 10)


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
@pytest.mark.parametrize("command", ["info", "eval", "quantize", "compress", "diagnose"])
def test_a_damaged_weights_file_is_one_clear_line(tiny_folder, tmp_path, capsys, damage, command):
    folder = _copy(tiny_folder, tmp_path)
    damage(folder / "model.safetensors")
    before = (folder / "model.safetensors").read_bytes()
    line = refused(argv(command, folder, tmp_path / "run" if command != "info" else None), capsys)
    assert str(folder) in line and ("corrupt" in line or "truncated" in line)
    assert (folder / "model.safetensors").read_bytes() == before  # the input is never touched


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"model_type": "no-such-family"}'])
def test_a_bad_config_json_is_one_clear_line(tiny_folder, tmp_path, capsys, text):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "config.json").write_text(text)
    assert "config" in refused(["info", str(folder)], capsys)


def test_a_folder_without_weights_or_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "config.json" in refused(["info", str(tmp_path / "empty")], capsys)
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "no weights" in refused(["info", str(tmp_path / "empty")], capsys)


@pytest.mark.parametrize("text,expect", [("steps: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "mapping"),
                                         ("bogus_field: 3\n", "unknown TrainConfig fields"),
                                         ("steps: many\n", "must be a number")])
def test_a_bad_config_file_is_refused_before_loading(tmp_path, capsys, text, expect):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    assert expect in refused(["finetune", "tiny:llama", "--config", str(path), "--out", str(out)], capsys)
    assert not out.exists()


@pytest.mark.parametrize("args,expect", [
    (["finetune", "tiny:llama", "--reg-option", "lam"], "--reg-option takes KEY=VALUE"),
    (["quantize", "tiny:llama", "--option", "=3"], "--option takes KEY=VALUE"),
    (["compress", "tiny:llama", "--ranks", "q=abc"], "a rank is a whole number"),
    (["compare", "tiny:llama"], "two or more models"),
    (["compress", "tiny:llama", "--keep", "0"], "keep must be a fraction"),
    (["compress", "tiny:llama", "--keep", "1.5"], "keep must be a fraction"),
    (["eval", "tiny:llama", "--overwrite", "--tasks", "nope"], "unknown task"),
    (["diagnose", "tiny:llama", "--n-samples", "0"], "--n-samples must be at least 1"),
    (["finetune", "tiny:llama", "--overwrite", "--resume"], "exclude each other"),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, capsys, args, expect):
    out = tmp_path / "run"
    assert expect in refused([*args, "--out", str(out)], capsys)
    assert not out.exists()


# -- 3. NaN and Inf are caught, with the tensor or layer named ---------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("command", ["info", "eval", "quantize", "compress", "diagnose", "finetune"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tiny_folder, tmp_path, capsys, value, command):
    folder = _copy(tiny_folder, tmp_path)
    poison(folder, value)
    out = tmp_path / "run" if command != "info" else None
    line = refused(argv(command, folder, out), capsys)
    assert "model.layers.1.mlp.down_proj.weight holds 1 NaN/Inf" in line
    assert out is None or not out.exists()


def test_a_nan_score_is_an_error_that_names_the_layer(tmp_path):
    from s2d.eval.suite import EvalConfig, evaluate

    model, tok = load_model("tiny:llama")
    model.model.layers[2].mlp.up_proj.register_forward_hook(lambda m, a, out: out * float("nan"))
    for task in ("ppl:wiki", "polarity"):
        with pytest.raises(S2DError, match=r"NaN/Inf: the output of model\.layers\.2\.mlp\.up_proj is the first"):
            evaluate(model, tok, EvalConfig(tasks=(task,), limit=2, ppl_tokens=256), progress=False)


def test_metrics_json_is_never_written_with_nan_and_the_old_one_survives(tmp_path):
    from s2d.io import atomic_write_json
    from s2d.runs import RunFolder

    with RunFolder(tmp_path / "run", "eval", {}) as run:
        run.write_metrics({"ppl": 12.5})
        with pytest.raises(S2DError, match=r"metric tasks\.ppl:wiki\.ppl is nan"):
            run.write_metrics({"tasks": {"ppl:wiki": {"ppl": float("nan")}}})
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"ppl": 12.5}
    # below the run folder too, any JSON s2d writes is valid JSON: NaN and Inf become null
    path = atomic_write_json(tmp_path / "x.json", {"a": float("inf"), "b": [1, float("nan")], "c": torch.tensor(2)})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {"a": None, "b": [1, None], "c": 2}


# -- 4. silent accepts are refused ------------------------------------------------------------------------


def test_a_missing_tensor_is_refused_not_randomly_initialized(tiny_folder, tmp_path, capsys):
    folder = _copy(tiny_folder, tmp_path)
    drop_tensor(folder, "model.layers.0.self_attn.k_proj.weight")
    for command in ("info", "eval", "compress"):
        line = refused(argv(command, folder, tmp_path / f"run-{command}" if command != "info" else None), capsys)
        assert "model.layers.0.self_attn.k_proj.weight" in line and "missing" in line


def test_an_unexpected_tensor_is_refused(tiny_folder, tmp_path, capsys):
    folder = _copy(tiny_folder, tmp_path)
    add_tensor(folder, "model.layers.0.extra.weight")
    assert "unexpected model.layers.0.extra.weight" in refused(["info", str(folder)], capsys)


def test_a_fresh_classifier_head_may_be_missing_but_nothing_else(tmp_path):
    folder = save_tiny(tmp_path / "bert", "bert")
    model, _ = load_model(folder, head="sequence-classification", num_labels=2)
    assert model.classifier.out_features == 2
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        query = next(k for k in f.keys() if k.endswith("layer.0.attention.self.query.weight"))
    drop_tensor(folder, query)
    with pytest.raises(S2DError, match="missing .*layer.0.attention.self.query.weight"):
        load_model(folder, head="sequence-classification", num_labels=2)


@pytest.mark.parametrize("command", WRITES_RUN)
def test_a_non_empty_run_folder_is_refused_and_left_alone(tmp_path, capsys, command):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = refused(argv(command, "tiny:llama", out), capsys)
    assert "--overwrite" in line and ("--resume" in line) == (command in ("finetune", "quantize"))
    assert sorted(p.name for p in out.iterdir() if p.name != ".s2d.lock") == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_run_and_a_failed_overwrite_puts_the_old_one_back(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = argv("eval", "tiny:llama", out)
    assert main(args) == 0
    first = (out / "metrics.json").read_bytes()

    def broken(*a, **k):
        raise S2DError("injected failure in the middle of the run")
    monkeypatch.setattr("s2d.commands.eval.evaluate", broken)
    assert "injected failure" in refused([*args, "--overwrite"], capsys)
    assert (out / "metrics.json").read_bytes() == first and not (out / ".s2d-previous").exists()
    monkeypatch.undo()
    assert main([*argv("eval", "tiny:llama", out, "--seq-len", "64"), "--overwrite"]) == 0
    assert "ppl:wiki@64" in json.loads((out / "metrics.json").read_text())["tasks"]
    assert not (out / ".s2d-previous").exists()


def test_a_failed_new_run_leaves_no_folder_and_a_resumable_one_keeps_its_progress(tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise S2DError("injected failure after the first cell")
    out = tmp_path / "eval"
    monkeypatch.setattr("s2d.commands.eval.evaluate", broken)
    refused(argv("eval", "tiny:llama", out), capsys)
    assert not out.exists()
    monkeypatch.undo()

    out = tmp_path / "sweep"
    cells = ["quantize", "tiny:llama", "--sweep", "--schemes", "W8A8,W4A8", "--methods", "rtn",
             *QUICK["quantize"][2:], "--out", str(out)]
    calls = []
    import s2d.commands.quantize as qrun

    real = qrun.quantize_one

    def second_cell_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise S2DError("injected failure in the second cell")
        return real(*a, **k)
    monkeypatch.setattr(qrun, "quantize_one", second_cell_fails)
    refused(cells, capsys)
    assert list(json.loads((out / "metrics.json").read_text())["results"]) == ["FP", "W8A8 rtn"]
    monkeypatch.undo()
    assert main([*cells, "--resume"]) == 0
    assert list(json.loads((out / "metrics.json").read_text())["results"]) == ["FP", "W8A8 rtn", "W4A8 rtn"]


# -- 5/6. leftovers of a killed write are removed, and said so ---------------------------------------------


def test_leftovers_of_a_killed_write_are_removed_on_the_next_start(tmp_path, caplog):
    out = tmp_path / "run"
    assert main([*argv("eval", "tiny:llama", out)]) == 0
    (out / ".model.abc123.tmp").mkdir()
    (out / ".model.abc123.tmp" / "model.safetensors").write_bytes(b"\0" * 4096)
    (out / ".metrics.json.x1.tmp").write_text("{")
    (out / "checkpoints" / ".step-4.zz.tmp").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="s2d.runs"):
        assert main([*argv("eval", "tiny:llama", out), "--overwrite"]) == 0
    assert "removed 3 leftover(s) of an interrupted write" in caplog.text
    assert not [p for p in out.rglob("*.tmp")]


def test_a_second_writer_is_refused_at_once(tmp_path, capsys):
    from s2d.runs import RunFolder

    with RunFolder(tmp_path / "run", "eval", {}):
        line = refused([*argv("eval", "tiny:llama", tmp_path / "run"), "--overwrite"], capsys)
        assert "in use by another s2d run (pid" in line
        assert (tmp_path / "run" / "config.yaml").is_file()
    assert main([*argv("eval", "tiny:llama", tmp_path / "run"), "--overwrite"]) == 0


def test_the_interrupted_message_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        (tmp_path / "ft" / "checkpoints" / "step-2").mkdir(parents=True)
        raise KeyboardInterrupt
    monkeypatch.setattr("s2d.commands.finetune.train", interrupted)
    args = argv("finetune", "tiny:llama", tmp_path / "ft")
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("s2d: interrupted;") and err.endswith("--resume`") and "Traceback" not in err
    assert (tmp_path / "ft" / "checkpoints" / "step-2").is_dir()

    monkeypatch.setattr("s2d.commands.eval.evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(argv("eval", "tiny:llama", tmp_path / "ev")) == 130
    assert "nothing of this run was kept" in capsys.readouterr().err and not (tmp_path / "ev").exists()


def test_an_internal_error_is_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr("s2d.arch.summary", lambda model: {}["boom"])
    assert main(["info", "tiny:llama"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("s2d: internal error: KeyError") and "-v" in err


def test_an_overflowed_quantize_cell_is_neither_recorded_nor_saved(tmp_path, capsys, monkeypatch):
    nan = {"model.layers.0.self_attn.q_proj": {"role": "q", "block": 0, "local_db": float("nan"),
                                               "accumulated_db": float("nan")}}
    monkeypatch.setattr("s2d.commands.quantize.layer_sqnr", lambda *a, **k: nan)
    out = tmp_path / "run"
    line = refused(argv("quantize", "tiny:llama", out), capsys)
    assert "sqnr.model.layers.0.self_attn.q_proj.local_db is nan" in line
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_custom_code_that_built_in_classes_make_unnecessary_is_skipped_and_said(tiny_folder, tmp_path, caplog):
    marker = tmp_path / "ran"
    folder = add_custom_code(_copy(tiny_folder, tmp_path), marker, config_needs_it=False)
    edit_json(folder / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")  # built in, auto_map kept
    with caplog.at_level("WARNING", logger="s2d.assets.hf"):
        assert main(["info", str(folder)]) == 0
    assert "ships custom code for its tokenizer" in caplog.text and "--trust-remote-code" in caplog.text
    assert not marker.exists()


def test_a_classifier_head_on_the_wrong_kind_of_backbone_is_refused_first(tiny_folder, tmp_path, capsys):
    line = refused(["finetune", str(tiny_folder), "--task", "cls", "--out", str(tmp_path / "run")], capsys)
    assert "sequence-classification head needs an encoder" in line and "--task lm" in line
    assert not (tmp_path / "run").exists()


def test_the_plain_loader_refuses_a_folder_s2d_wrote_and_names_the_right_one(tmp_path):
    from s2d.assets import load_model as plain_load

    assert main(argv("compress", "tiny:llama", tmp_path / "run", "--method", "svd")) == 0
    with pytest.raises(S2DError, match=r"written by `s2d compress`; load it with s2d\.load_model"):
        plain_load(tmp_path / "run" / "model")
    model, _ = load_model(tmp_path / "run" / "model")  # the public loader restores it
    assert any(type(m).__name__ == "FactorizedLinear" for m in model.modules())
