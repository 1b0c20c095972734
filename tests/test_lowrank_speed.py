"""--skip-slower: a Linear whose factorized matmuls time slower stays dense. Timings are faked, never asserted on."""

import json
import math

import pytest
import torch
from torch import nn

import s2d.lowrank.speed as speed
from s2d import load_model
from s2d.errors import S2DError
from s2d.lowrank import FactorizedLinear, LowRankConfig, compress, compress_folder
from s2d.lowrank.budget import model_parameters
from s2d.lowrank.speed import SpeedCheck, time_matmuls

pytestmark = pytest.mark.usefixtures("one_thread")

SLOW = (64, 128)  # (d_in, d_out) of tiny:llama's gate and up projections


def _fake_timer(calls: list):
    """Factorized is 'slower' for the SLOW shape only, and faster everywhere else."""
    def timer(d_in, d_out, rank, tokens):
        calls.append((d_in, d_out, rank, tokens))
        return (1.0, 2.0) if (d_in, d_out) == SLOW else (2.0, 1.0)
    return timer


def _factorized(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def _calib():
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["svd", "rom"])
def test_a_slower_shape_stays_dense_and_the_rest_is_compressed_as_before(monkeypatch, method):
    base, _ = load_model("tiny:llama")
    plain = compress(base, LowRankConfig(method=method, keep=0.8, chunk_size=3), calib=_calib(), progress=False)
    calls = []
    monkeypatch.setattr(speed, "time_matmuls", _fake_timer(calls))
    model, _ = load_model("tiny:llama")
    config = LowRankConfig(method=method, keep=0.8, chunk_size=3, skip_slower=True, skip_slower_tokens=4)
    report = compress(model, config, calib=_calib(), progress=False)

    slow = {n for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj"))}
    for name in slow:
        assert type(model.get_submodule(name)) is nn.Linear  # left dense, with its own weight
    skipped = report.speed["skipped"]
    assert set(skipped) == slow & set(plain.ranks) and skipped
    assert all(s["dense_s"] == 1.0 and s["factorized_s"] == 2.0 for s in skipped.values())
    # every other Linear got the rank the plain run gave it
    assert _factorized(model) == {n: r for n, r in plain.ranks.items() if n not in slow} == report.ranks
    # each distinct (d_in, d_out, rank) was timed once, at the token count asked for
    assert len(calls) == len(set(calls)) and {c[3] for c in calls} == {4}
    assert {(c[0], c[1], c[2]) for c in calls} == {(d_in, d_out, r) for d_in, d_out, r in
                                                   ((model.get_submodule(n).in_features,
                                                     model.get_submodule(n).out_features, plain.ranks[n])
                                                    for n in plain.ranks)}
    # honest counts: the skipped Linears keep their dense parameters, so more than --keep is kept
    s = report.summary
    assert s["params_after"] == model_parameters(model)
    assert s["fraction_kept"] == pytest.approx(model_parameters(model) / s["params_before"])
    assert s["fraction_kept"] > plain.summary["fraction_kept"]
    assert report.speed["fraction_kept"] == s["fraction_kept"]
    assert report.speed["planned_fraction_kept"] == plain.summary["fraction_kept"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_calib()).logits).all()


def test_off_by_default_times_nothing_and_changes_nothing(monkeypatch):
    def never(*args):
        raise AssertionError("timed although skip_slower is off")

    monkeypatch.setattr(speed, "time_matmuls", never)
    assert LowRankConfig().skip_slower is False
    first, _ = load_model("tiny:llama")
    second, _ = load_model("tiny:llama")
    a = compress(first, LowRankConfig(method="svd", keep=0.8), progress=False)
    b = compress(second, LowRankConfig(method="svd", keep=0.8, skip_slower_tokens=256), progress=False)
    assert a.speed is None and b.speed is None and a.ranks == b.ranks and a.summary == b.summary
    assert _factorized(first) == a.ranks


def test_nothing_slower_compresses_exactly_as_without_the_option(monkeypatch):
    monkeypatch.setattr(speed, "time_matmuls", lambda d_in, d_out, rank, tokens: (2.0, 1.0))
    first, _ = load_model("tiny:llama")
    second, _ = load_model("tiny:llama")
    a = compress(first, LowRankConfig(method="svd", keep=0.8), progress=False)
    b = compress(second, LowRankConfig(method="svd", keep=0.8, skip_slower=True), progress=False)
    assert b.speed["skipped"] == {} and a.ranks == b.ranks and a.summary == b.summary
    ids = _calib()
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_from_disk_skips_the_same_linears(monkeypatch, tmp_path):
    from s2d.assets.hf import model_class, pretrained_config

    monkeypatch.setattr(speed, "time_matmuls", _fake_timer([]))
    model, tok = load_model("tiny:llama")
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    config = LowRankConfig(method="svd", keep=0.8, skip_slower=True)
    mem = compress(model, config, progress=False)
    hf = pretrained_config(tmp_path / "dense", trust_remote_code=False)
    disk = compress_folder(tmp_path / "dense", config, tmp_path / "out", progress=False, hf_config=hf,
                           model_class=model_class(hf))
    assert disk.speed["skipped"] == mem.speed["skipped"] and disk.ranks == mem.ranks
    again, _ = load_model(tmp_path / "out")
    assert _factorized(again) == mem.ranks


def test_cli_skip_slower_lists_the_skipped_linears_in_metrics(monkeypatch, tmp_path):
    from s2d.cli import main

    monkeypatch.setattr(speed, "time_matmuls", _fake_timer([]))
    out = tmp_path / "run"
    assert main(["compress", "tiny:llama", "--method", "svd", "--keep", "0.8", "--skip-slower",
                 "--skip-slower-tokens", "8", "--no-model", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    speed_info = metrics["compression"]["speed"]
    assert speed_info["tokens"] == 8 and metrics["compression"]["config"]["skip_slower"] is True
    assert speed_info["skipped"] and all(n.endswith(("gate_proj", "up_proj")) for n in speed_info["skipped"])
    assert not set(speed_info["skipped"]) & set(metrics["compression"]["ranks"])


def test_speed_check_times_each_shape_once():
    calls = []
    check = SpeedCheck(tokens=3, timer=_fake_timer(calls))
    for _ in range(3):
        assert check.check(64, 128, 8).slower
        assert not check.check(128, 64, 8).slower
    assert calls == [(64, 128, 8, 3), (128, 64, 8, 3)]
    t = check.check(64, 128, 8)
    assert t.fewer_flops and not check.check(64, 128, 60).fewer_flops  # 8·192 < 64·128 ≤ 60·192


def test_time_matmuls_returns_per_call_seconds():
    dense_s, factorized_s = time_matmuls(32, 48, 4, tokens=2, repeats=3, min_seconds=1e-4)
    assert all(math.isfinite(t) and 0 < t < 1 for t in (dense_s, factorized_s))


def test_bad_settings_are_refused():
    with pytest.raises(S2DError, match="skip_slower_tokens"):
        LowRankConfig(skip_slower=True, skip_slower_tokens=0).validate()
    with pytest.raises(S2DError, match="--search"):
        LowRankConfig(skip_slower=True, search="ppl").validate()
    with pytest.raises(S2DError, match="≥ 1"):
        time_matmuls(0, 8, 1)
