"""s2d.experiments.vit_levers: the levers' flags and stages, and the table and reading from synthetic run folders."""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
from pathlib import Path

import pytest

from s2d.experiments import vit_levers
from s2d.experiments.vit import S2D


@pytest.fixture
def exp(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    module = importlib.import_module("exp_vit_static")
    monkeypatch.setattr(module, "select_tau", lambda root: {"reg_option": "tau=0.9"})
    return module


def options_of(flags: list[str]) -> dict[str, str]:
    return dict(flags[i + 1].split("=", 1) for i, f in enumerate(flags) if f == "--reg-option")


def test_s2d_flags_replace_and_add_options():
    flags = vit_levers.s2d_flags([*S2D, "--reg-option", "tau=0.9"], {"lam": 5, "roles": "o,down,fc2"})
    assert flags[:2] == ["--reg", "s2d"] and flags.count("--reg") == 1
    assert options_of(flags) == {**options_of(S2D), "tau": "0.9", "lam": "5", "roles": "o,down,fc2"}
    assert flags.count("--reg-option") == len(options_of(flags))  # lam once: replaced, not repeated


def test_levers_only_runs_the_two_arms_and_the_levers_seed_by_seed(tmp_path, exp):
    args = argparse.Namespace(seeds=[2, 0], lr=2e-3, ft_lr=3e-4, curve_points=4, model=exp.MODEL,
                              levers=["lam5", "writers-all-lam5"], levers_only=True)
    plan = exp.later_stages(tmp_path, args, spe=10, steps=40)
    names = [n for n, _, _ in plan]
    assert names == ["ft-adamw-s2", "ft-s2d-s2", "lever-lam5-s2", "lever-writers-all-lam5-s2",
                     "ft-adamw-s0", "ft-s2d-s0", "lever-lam5-s0", "lever-writers-all-lam5-s0"]
    assert all(kind == {"cells": vit_levers.LEVER_CELLS} for _, _, kind in plan)
    cmds = {n: c for n, c, _ in plan}
    assert cmds["lever-lam5-s0"][cmds["lever-lam5-s0"].index("--seed") + 1] == "0"
    assert options_of(cmds["lever-lam5-s2"]) == {**options_of(cmds["ft-s2d-s2"]), "lam": "5"}
    assert options_of(cmds["lever-writers-all-lam5-s0"])["selection"] == "all"
    assert "--reg-option" not in cmds["ft-adamw-s0"]
    full = exp.later_stages(tmp_path, argparse.Namespace(**{**vars(args), "levers_only": False}), spe=10, steps=40)
    assert [n for n, _, _ in full][0] == "pretrain-long-s2d" and [n for n, _, _ in full][-2:] == \
        ["lever-lam5-s0", "lever-writers-all-lam5-s0"]  # after everything the full run plans


def _write(root: Path, name: str, acc: dict, residual: float, selected: int | None = None,
           median: float | None = None) -> None:
    (root / name).mkdir(parents=True)
    max_abs = {"residual": residual} | ({} if median is None else  # two blocks, the second at half the first's size
                                        {"blocks": [{"max": residual, "median": median},
                                                    {"max": residual / 2, "median": median / 2}]})
    (root / name / "ptq.json").write_text(json.dumps({"n_test": 100, "max_abs": max_abs, **acc}))
    if selected is not None:
        # the last refresh drops one Linear; of those kept, l0 goes 4 → 3 (−25 %), l1 2 → 1 (−50 %), the rest stay at 9
        sigma = {0: [4.0, 2.0], 50: [3.0, 1.0]}
        refreshes = [{"step": s, "selected": {f"l{i}": 1 for i in range(selected - s // 50)},
                      "selected_sigma": {f"l{i}": [sigma[s][i] if i < 2 else 9.0, 0.5]
                                         for i in range(selected - s // 50)}} for s in (0, 50)]
        (root / name / "metrics.json").write_text(json.dumps({"refreshes": refreshes}))


@pytest.mark.parametrize("gain", [0.05, 0.01])
def test_summary_table_and_reading(tmp_path, gain):
    target = vit_levers.TARGET_CELL
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        base = {c: 0.86 + noise for c in vit_levers.LEVER_CELLS} | {target: 0.79 + noise}
        _write(tmp_path, f"ft-adamw-s{seed}", base, residual=100.0, median=10.0)
        _write(tmp_path, f"ft-s2d-s{seed}", base, residual=100.0, selected=10)  # no per-block record
        _write(tmp_path, f"lever-lam20-s{seed}", base | {target: 0.79 + noise + gain + 0.001 * seed,
                                                         "FP": 0.85 + noise}, residual=50.0 + seed, selected=12,
               median=5.0)
    (tmp_path / "lever-lam5-s0").mkdir()  # started, never measured: not an arm yet
    s = vit_levers.summary(tmp_path)
    assert list(s) == ["ft-adamw", "ft-s2d", "lever-lam20"]
    lever = s["lever-lam20"]
    assert lever["cells"][target]["diff"] == pytest.approx(100 * gain + 0.1)
    assert lever["cells"]["FP"]["diff"] == pytest.approx(-1.0)
    assert lever["residual_change"][0] == pytest.approx(-49.0)
    assert lever["decayed"] == (12, 11)
    assert lever["sigma_change"] == pytest.approx(statistics.mean([-25.0, -50.0, *[0.0] * 9]))
    assert s["ft-adamw"]["cells"][target]["gap"] == pytest.approx(7.0) and s["ft-adamw"]["decayed"] is None
    assert s["ft-adamw"]["median"] == pytest.approx(7.5) and s["ft-adamw"]["peak_to_median"] == pytest.approx(10.0)
    assert lever["median"] == pytest.approx(3.75) and lever["median_change"][0] == pytest.approx(-50.0)
    assert lever["peak_to_median"] == pytest.approx(10.2)  # (50 + seed) / 5, seeds 0-2
    assert s["ft-s2d"]["median"] is None and s["ft-s2d"]["median_change"] == (None, None)
    assert "lam=20" in vit_levers.table(tmp_path)
    text = " ".join(vit_levers.reading(tmp_path))
    assert "AdamW (3 seeds) loses 7.00 points to FP at W4A4 static+resid" in text
    assert ("reached by lever-lam20" in text) == (gain >= 0.03)
    assert "The largest cut of the residual max is lever-lam20's (-49.0 %)" in text
    assert "The stream was scaled down as a whole, not its peaks: its median |x| changed -50.0 % too, so the " \
           "max / median |x| of the block outputs went 10 → 10.2 (+2.0 %)" in text


def test_no_levers_no_section(tmp_path):
    _write(tmp_path, "ft-adamw-s0", {"FP": 0.9}, residual=1.0)
    assert vit_levers.summary(tmp_path) == {} and vit_levers.reading(tmp_path) == []


def test_plan_keeps_the_arms_command_and_the_levers_command_apart(tmp_path, exp, monkeypatch):
    import s2d.assets

    monkeypatch.setattr(s2d.assets, "load_fashion_mnist", lambda split: (None, [0] * 60))
    args = argparse.Namespace(smoke=False, model=exp.MODEL, steps_per_epoch=10, epochs=2, lr=2e-3, ft_lr=3e-4,
                              curve_points=2, seeds=[0], n_test=100, levers=[], levers_only=False)

    def run(argv: list[str], **changed) -> dict:
        monkeypatch.setattr("sys.argv", ["exp_vit_static.py", *argv])
        exp.write_plan(tmp_path, argparse.Namespace(**{**vars(args), **changed}))
        return json.loads((tmp_path / "plan.json").read_text())

    assert run(["--pretrain-only"])["command"] == "python bench/exp_vit_static.py --pretrain-only"
    lever = run(["--levers", "lam5", "--levers-only"], levers=["lam5"], levers_only=True, seeds=[1])
    assert lever["command"] == "python bench/exp_vit_static.py --pretrain-only"  # the arms' stays
    assert lever["lever_command"] == "python bench/exp_vit_static.py --levers lam5 --levers-only"
    assert lever["seeds"] == [0, 1]
    full = run(["--jobs", "2"])
    assert full["command"] == "python bench/exp_vit_static.py --jobs 2" and full["lever_command"] == \
        lever["lever_command"]
    with pytest.raises(SystemExit, match="other settings"):
        run(["--epochs", "3"], epochs=3)
