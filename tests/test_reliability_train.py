"""Fine-tuning under failure: resumes keep the whole record, damaged checkpoints and task/model mismatches are
clear S2DErrors, and a diverging run names the layer where the NaN or Inf started."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train import Interrupt, _interrupt_at

from s2d.assets import load_model
from s2d.cli import main
from s2d.commands.tasks import make_task
from s2d.errors import S2DError
from s2d.train import TrainConfig, train


def _config(**kw) -> TrainConfig:
    base = dict(steps=8, lr=1e-3, warmup=2, batch_size=4, grad_accum=2, seq_len=32, log_every=1, eval_every=2,
                eval_samples=2, checkpoint_every=2, keep_checkpoints=2, reg="s2d",
                reg_config={"refresh_every": 2, "form": "decoupled", "lam": 0.05, "tau": 0.1})
    base.update(kw)
    return TrainConfig(**base)


def _fresh(config: TrainConfig, spec: str = "tiny:llama"):
    model, tok = load_model(spec)
    return model, make_task(config, model, tok)


def _run(folder: Path, config: TrainConfig, kill_at: int | None = None):
    """One process's life: train from whatever `folder` holds; with `kill_at`, die as that step begins."""
    model, task = _fresh(config)
    if kill_at is not None:
        _interrupt_at(task, kill_at)
        with pytest.raises(Interrupt):
            train(model, task, config, folder, model_name="tiny:llama", progress=False)
        return None
    return model, train(model, task, config, folder, model_name="tiny:llama", progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("whole"), _config())


def _assert_same_run(reference, resumed) -> None:
    (model_a, a), (model_b, b) = reference, resumed
    assert b.resumed_from is not None
    assert [h["step"] for h in b.history] == list(range(1, 9))
    assert b.history == a.history  # every field, losses bit for bit (floats compare exactly)
    assert [e["step"] for e in b.evals] == [2, 4, 6, 8] and b.evals == a.evals
    assert [r["step"] for r in b.reg_log] == [0, 2, 4, 6] and b.reg_log == a.reg_log
    assert json.dumps(b.history) == json.dumps(a.history)
    for (name, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("kill_at", [3, 4, 7])
def test_one_interruption_keeps_the_whole_record(tmp_path, uninterrupted, kill_at):
    _run(tmp_path, _config(), kill_at)
    resumed = _run(tmp_path, _config())
    assert resumed[1].resumed_from == kill_at // 2 * 2
    _assert_same_run(uninterrupted, resumed)


def test_three_interruptions_in_one_run_keep_the_whole_record(tmp_path, uninterrupted):
    for kill_at in (3, 5, 7):
        _run(tmp_path, _config(), kill_at)
    resumed = _run(tmp_path, _config())
    assert resumed[1].resumed_from == 6
    _assert_same_run(uninterrupted, resumed)
    record = json.loads((tmp_path / "step-8" / "record.json").read_text())
    assert record == {"history": resumed[1].history, "evals": resumed[1].evals, "reg_log": resumed[1].reg_log}


def test_checkpoint_without_a_record_still_resumes(tmp_path):
    _run(tmp_path, _config(), kill_at=5)
    (tmp_path / "step-4" / "record.json").unlink()  # as written before checkpoints kept the record
    _, result = _run(tmp_path, _config())
    assert result.resumed_from == 4
    assert [h["step"] for h in result.history] == [5, 6, 7, 8] and [e["step"] for e in result.evals] == [6, 8]


# -- damaged checkpoints ----------------------------------------------------------------------------------------


def _state_without(key: str):
    def corrupt(folder: Path) -> None:
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        del state[key]
        torch.save(state, folder / "trainer_state.pt")
    return corrupt


def _truncate(name: str, keep: float):
    def corrupt(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
    return corrupt


CORRUPTIONS = {
    "empty trainer_state.pt": _truncate("trainer_state.pt", 0),
    "truncated trainer_state.pt": _truncate("trainer_state.pt", 0.5),
    "trainer_state.pt without the optimizer": _state_without("optimizer"),
    "empty model.safetensors": _truncate("model.safetensors", 0),
    "truncated model.safetensors": _truncate("model.safetensors", 0.9),
    "garbled model.safetensors header": lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64),
    "missing model.safetensors": lambda f: (f / "model.safetensors").unlink(),
    "meta.json not JSON": lambda f: (f / "meta.json").write_text("{"),
    "meta.json a list": lambda f: (f / "meta.json").write_text("[]"),
    "record.json truncated": _truncate("record.json", 0.5),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    _run(folder, _config(steps=4, eval_every=0))
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4"]
    return folder


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_checkpoint_is_a_clear_error_and_nothing_is_removed(tmp_path, finished, corruption):
    shutil.copytree(finished, tmp_path / "run")
    root = tmp_path / "run"
    CORRUPTIONS[corruption](root / "step-4")
    before = _snapshot(root)
    model, task = _fresh(_config(steps=4, eval_every=0))
    with pytest.raises(S2DError) as caught:
        train(model, task, _config(steps=4, eval_every=0), root, model_name="tiny:llama", progress=False)
    message = str(caught.value)
    assert f"checkpoint {root / 'step-4'} is unreadable" in message
    assert f"delete that folder to resume from the previous checkpoint {root / 'step-2'}" in message
    assert "\n" not in message
    assert _snapshot(root) == before


def test_damaged_only_checkpoint_says_to_start_afresh(tmp_path, finished):
    shutil.copytree(finished / "step-2", tmp_path / "step-2")
    (tmp_path / "step-2" / "trainer_state.pt").write_bytes(b"")
    model, task = _fresh(_config(steps=4))
    with pytest.raises(S2DError, match=r"step-2 is unreadable \(EOFError.*start the run afresh"):
        train(model, task, _config(steps=4), tmp_path, model_name="tiny:llama", progress=False)
    assert (tmp_path / "step-2" / "model.safetensors").stat().st_size > 0


# -- task/model mismatch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "task", "needs", "fits"), [
    ("tiny:llama", "cls", "an encoder (bert, mpnet)", "lm"),
    ("tiny:llama", "image", "a vision model (vit)", "lm"),
    ("tiny:bert", "image", "a vision model (vit)", "cls"),
    ("tiny:bert", "lm", "a decoder (llama, qwen2, gemma3)", "cls"),
    ("tiny:vit", "lm", "a decoder", "image"),
    ("tiny:vit", "cls", "an encoder", "image"),
])
def test_task_model_mismatch_is_one_clear_line(tmp_path, capsys, spec, task, needs, fits):
    rc = main(["finetune", spec, "--task", task, "--steps", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("s2d: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert f"task {task} needs {needs}" in err and err.rstrip().endswith(f"use --task {fits}")
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.parametrize(("spec", "task"), [("tiny:mpnet", "cls"), ("tiny:vit", "image"), ("tiny:qwen2", "lm")])
def test_matching_task_and_model_are_accepted(spec, task):
    model, tok = load_model(spec)
    made = make_task(TrainConfig(task=task, seq_len=32, eval_samples=2), model, tok)
    assert made.batch(0, 0, 2)["labels"].shape[0] == 2


# -- divergence -------------------------------------------------------------------------------------------------


def _diverge_at(step: int, linear: str, poison, tmp_path: Path) -> str:
    """Train with `poison` applied once to `linear`'s weight as `step` begins; the S2DError's message."""
    config = _config(steps=5, eval_every=0)
    model, task = _fresh(config)
    original, poisoned = task.batch, []

    def batch(s, *args, **kwargs):
        if s == step and not poisoned:  # once: every micro-batch and the diagnosis's replay ask again
            poisoned.append(step)
            with torch.no_grad():
                poison(model.get_submodule(linear).weight)
        return original(s, *args, **kwargs)
    task.batch = batch
    with pytest.raises(S2DError) as caught:
        train(model, task, config, tmp_path, model_name="tiny:llama", progress=False)
    return str(caught.value)


def _one_nan(w: torch.Tensor) -> None:
    w.view(-1)[7] = float("nan")


def test_nan_weight_is_named_with_step_and_last_good_checkpoint(tmp_path):
    message = _diverge_at(3, "model.layers.1.mlp.down_proj", _one_nan, tmp_path)
    assert message.startswith("the loss became nan at step 3: parameter model.layers.1.mlp.down_proj.weight")
    assert f"the last good checkpoint is {tmp_path / 'step-2'}" in message


def test_forward_overflow_names_the_linear_whose_output_is_inf(tmp_path):
    message = _diverge_at(3, "model.layers.1.mlp.up_proj", lambda w: w.fill_(1e38), tmp_path)  # finite, huge
    assert "at step 3: the first module whose output is NaN or Inf is model.layers.1.mlp.up_proj (Linear)" in message
    assert str(tmp_path / "step-2") in message


def test_gradient_overflow_names_the_linear_with_the_huge_output(tmp_path):
    message = _diverge_at(1, "model.layers.0.self_attn.q_proj", lambda w: w.mul_(1e38), tmp_path)
    assert message.startswith("the gradient norm became non-finite at step 1: the forward is finite")
    assert "the largest activation is the output of model.layers.0.self_attn.q_proj " in message
    assert "no checkpoint was written before it" in message
    assert not any(tmp_path.iterdir())  # the overflowing step never reached the weights or a checkpoint


@pytest.mark.parametrize("kw", [{"log_every": 0}, {"checkpoint_every": 0}, {"keep_checkpoints": 0},
                                {"eval_every": -1}])
def test_loop_intervals_are_validated(kw):
    with pytest.raises(S2DError, match="checkpoint_every and keep_checkpoints must be ≥ 1"):
        _config(**kw).validate()
