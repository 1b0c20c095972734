import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from s2d import load_model
from s2d.commands.tasks import make_task
from s2d.errors import S2DError
from s2d.train import TrainConfig, train


def _config(**kw) -> TrainConfig:
    base = dict(steps=6, lr=1e-3, warmup=2, batch_size=4, grad_accum=2, seq_len=32, eval_every=0, log_every=1,
                checkpoint_every=3, reg="s2d", reg_config={"refresh_every": 2, "form": "decoupled", "lam": 0.05,
                                                           "tau": 0.1})
    base.update(kw)
    return TrainConfig(**base)


def _fresh(spec="tiny:llama", config=None):
    model, tok = load_model(spec)
    return model, make_task(config or _config(), model, tok)


class Interrupt(Exception):
    pass


def _interrupt_at(task, step):
    original = task.batch

    def batch(s, *args, **kwargs):
        if s == step:
            raise Interrupt
        return original(s, *args, **kwargs)
    task.batch = batch


@pytest.mark.parametrize("spec,task_kw", [("tiny:llama", {}), ("tiny:bert", {"task": "cls"})])
def test_resume_equals_uninterrupted_bitwise(tmp_path, spec, task_kw):
    config = _config(**task_kw)
    model_a, task_a = _fresh(spec, config)
    result_a = train(model_a, task_a, config, tmp_path / "a", model_name=spec, progress=False)

    model_b, task_b = _fresh(spec, config)
    _interrupt_at(task_b, 4)  # dies after the step-3 checkpoint
    with pytest.raises(Interrupt):
        train(model_b, task_b, config, tmp_path / "b", model_name=spec, progress=False)
    model_c, task_c = _fresh(spec, config)
    result_c = train(model_c, task_c, config, tmp_path / "b", model_name=spec, progress=False)
    assert result_c.resumed_from == 3
    for (name, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        assert torch.equal(a, c), name
    assert result_a.history[-1]["loss"] == result_c.history[-1]["loss"]


def test_s2d_refreshes_and_logs(tmp_path):
    config = _config(reg_config={"refresh_every": 2, "selection": "all", "lam": 0.5})
    model, task = _fresh(config=config)
    result = train(model, task, config, None, progress=False)
    assert [r["step"] for r in result.reg_log] == [0, 2, 4]
    assert all(h["penalty"] > 0 for h in result.history)
    assert all(h["sigma_max"] > 0 and h["max_abs_act"] > 0 for h in result.history)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = _config(checkpoint_every=2)
    model, task = _fresh(config=config)
    original = task.batch

    def poisoned(step, *args, **kwargs):
        if step == 3:
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(float("nan"))
        return original(step, *args, **kwargs)
    task.batch = poisoned
    with pytest.raises(S2DError, match=r"loss became nan at step 3.*step-2"):
        train(model, task, config, tmp_path, progress=False)
    weights = load_file(tmp_path / "step-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_resume_refuses_another_model_or_world_size(tmp_path):
    config = _config(steps=3)
    model, task = _fresh(config=config)
    train(model, task, config, tmp_path, model_name="tiny:llama", progress=False)
    config = _config(steps=6)
    other, task = _fresh("tiny:qwen2", config)
    with pytest.raises(S2DError, match="written for model='tiny:llama'"):
        train(other, task, config, tmp_path, model_name="tiny:qwen2", progress=False)
    meta = tmp_path / "step-3" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "world_size": 4}))
    model, task = _fresh(config=config)
    with pytest.raises(S2DError, match="world_size=4"):
        train(model, task, config, tmp_path, model_name="tiny:llama", progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    config = _config(steps=3)
    model, task = _fresh(config=config)
    train(model, task, config, tmp_path, model_name="tiny:llama", progress=False)
    (tmp_path / "step-3" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    model, task = _fresh(config=_config())
    with pytest.raises(S2DError, match="unreadable"):
        train(model, task, _config(), tmp_path, model_name="tiny:llama", progress=False)


@pytest.mark.parametrize(("kw", "match"), [
    ({"task": "speech"}, "task"), ({"reg": "magic"}, "reg"), ({"batch_size": 3}, "divisible"), ({"lr": 0}, "lr"),
])
def test_bad_train_config(kw, match):
    with pytest.raises(S2DError, match=match):
        _config(**kw).validate()


def _finetune_cmd(out, launcher):
    args = ["finetune", "tiny:llama", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-3",
            "--reg", "s2d", "--reg-option", "refresh_every=2", "--reg-option", "tau=0.2", "--eval-every", "0",
            "--checkpoint-every", "3", "--out", str(out)]
    return launcher + ["-m", "s2d"] + args


def test_ddp_two_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) against 1 process, same global batch: same final weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_finetune_cmd(tmp_path / "one", [sys.executable]), env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    refreshes = json.loads((tmp_path / "one" / "metrics.json").read_text())["refreshes"]
    assert [r["step"] for r in refreshes] == [0, 2] and any(r["selected"] for r in refreshes)
    for r in refreshes:  # the run folder records σ and PCDR of exactly the layers S2D selected
        assert set(r["selected_sigma"]) == set(r["selected_pcdr"]) == set(r["selected"])
        assert all(s == sorted(s, reverse=True) for s in r["selected_sigma"].values())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(_finetune_cmd(tmp_path / "two", torchrun), env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    reloaded, _ = load_model(tmp_path / "two" / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(t.numel() for t in a.values())


def test_qat_trains_through_fake_quant_and_saves_the_integers_it_simulated(tmp_path):
    import copy

    from s2d.commands.finetune import finetune
    from s2d.quant import FakeQuantLinear, QuantConfig, prepare_qat, quantize, quantized_layers

    base = dict(task="lm", steps=3, batch_size=2, seq_len=32, lr=1e-3, warmup=0, eval_every=0, log_every=1)
    plain = finetune("tiny:llama", TrainConfig(**base), tmp_path / "plain", progress=False)
    qat = finetune("tiny:llama", TrainConfig(**base, qat="W4A4", reg="s2d"), tmp_path / "qat", progress=False)
    assert qat.history[0]["loss"] != plain.history[0]["loss"]  # the first forward already rounds at 4 bits
    model, _ = load_model(tmp_path / "qat" / "model")
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())  # saved as an ordinary model
    integer, _ = load_model(tmp_path / "qat" / "model-quantized")
    assert len(quantized_layers(integer)) == 21
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    simulated = prepare_qat(copy.deepcopy(model), QuantConfig.from_scheme("W4A4"))
    rtn = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A4"), progress=False)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (simulated, integer, rtn))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4) and torch.allclose(a, c, rtol=1e-4, atol=1e-4)


def test_learned_qat_scales_train_and_convert_exactly():
    import copy

    from s2d.quant import QuantConfig, convert_qat, prepare_qat

    model, _ = load_model("tiny:llama")
    config = QuantConfig.from_scheme("W4A8")
    prepare_qat(model, config, learn_scales=True)
    scales = [p for n, p in model.named_parameters() if n.endswith("weight_scale")]
    assert len(scales) == 21 and all(p.dim() == 1 for p in scales)
    before = [p.detach().clone() for p in scales]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales)
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, scales, strict=True))
    integer = convert_qat(copy.deepcopy(model), config)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, integer(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_learned_scales_need_symmetric_per_channel_weights():
    from s2d.quant import QuantConfig, prepare_qat

    model, _ = load_model("tiny:llama")
    with pytest.raises(S2DError, match="symmetric per-channel"):
        prepare_qat(model, QuantConfig.from_scheme("W4A8", w_granularity="per_group", w_group_size=16),
                    learn_scales=True)


def test_bad_qat_scheme_is_a_clear_error():

    with pytest.raises(S2DError, match="bits"):
        TrainConfig(qat="W1A4").validate()
