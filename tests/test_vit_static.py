"""s2d.experiments.vit_static: the cells' configs, and the table and reading built from synthetic run folders."""

from __future__ import annotations

import json

import pytest
import torch

from s2d.experiments import vit_static


def test_cell_configs():
    static = vit_static.quant_config("W5A5 static+reparam")
    assert (static.w_bits, static.a_bits, static.a_static, static.a_granularity, static.ln_reparam) == \
        (5, 5, True, "per_tensor", True)
    assert not vit_static.quant_config("W4A4 static").ln_reparam
    dynamic = vit_static.quant_config("W4A4 dynamic")
    assert (dynamic.a_static, dynamic.a_granularity) == (False, "per_token")
    repq = vit_static.quant_config("W6A6 static+repq")  # RepQ-ViT's full setting
    assert (repq.w_bits, repq.a_bits, repq.a_static, repq.a_granularity, repq.ln_reparam) == \
        (6, 6, True, "per_tensor", True)
    assert (repq.softmax_bits, repq.patch_embed_bits, repq.layer_schemes) == (6, 8, {"head": "W8A8"})
    plain = vit_static.quant_config("W6A6 static+reparam")
    assert (plain.softmax_bits, plain.patch_embed_bits, plain.layer_schemes) == (None, None, {})
    assert plain.residual_bits is None
    resid = vit_static.quant_config("W5A5 static+resid")  # the residual stream too, at the activation bits
    assert (resid.residual_bits, resid.a_static, resid.a_granularity, resid.ln_reparam) == \
        (5, True, "per_tensor", False)
    control = vit_static.quant_config("W4A4 dynamic+resid")
    assert (control.residual_bits, control.a_static, control.a_granularity) == (4, False, "per_token")
    for bad in ("W4A4 dynamic+reparam", "W4A4 static+nothing", "W4A4 sometimes"):
        with pytest.raises(ValueError, match="not a cell name"):
            vit_static.quant_config(bad)


def test_cells_and_paper_rows():
    assert {f"{s} static+repq" for s in vit_static.PTQ_SCHEMES} <= set(vit_static.CELLS)
    assert vit_static.CELLS[-1] == "W4A4 dynamic"  # reading() takes the static cells as CELLS[1:-1]
    assert set(vit_static.PAPER) <= set(vit_static.CELLS)
    repq_rows = {c for c, (name, *_) in vit_static.PAPER.items() if name.startswith(("RepQ-ViT", "ERQ"))}
    assert repq_rows == {"W6A6 static+repq", "W5A5 static+repq", "W4A4 static+repq"}


def test_repq_cell_quantizes_a_vit(tmp_path):
    import torch

    from s2d.assets import load_model
    from s2d.quant import quantize
    from s2d.quant.conv import QuantConv2d
    from s2d.quant.softmax import LogSqrt2Quant

    model, _ = load_model("tiny:vit")
    c, n = model.config.num_channels, model.config.image_size
    calib = {"pixel_values": torch.randn(4, c, n, n, generator=torch.Generator().manual_seed(0))}
    q = quantize(model, vit_static.quant_config("W4A4 static+repq"), calib=calib, progress=False)
    assert isinstance(q.vit.embeddings.patch_embeddings.projection, QuantConv2d)
    assert q.classifier.w_spec.bits == 8 and q.classifier.a_spec.bits == 8
    assert sum(isinstance(m, LogSqrt2Quant) and m.bits == 4 for m in q.modules()) == q.config.num_hidden_layers


def _write(root, name, acc):
    (root / name).mkdir(parents=True)
    (root / name / "ptq.json").write_text(json.dumps({"n_test": 100, **acc}))


@pytest.mark.parametrize("s2d_gain", [0.06, 0.0])
def test_summary_and_reading(tmp_path, s2d_gain):
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        base = {c: 0.80 + noise for c in vit_static.CELLS} | {"W4A4 static": 0.70 + noise}
        _write(tmp_path, f"ft-adamw-s{seed}", base)
        _write(tmp_path, f"ft-s2d-s{seed}", base | {"W4A4 static": 0.70 + noise + s2d_gain + 0.001 * seed})
    s = vit_static.summary(tmp_path)
    cell = s["cells"]["W4A4 static"]
    assert s["paired_seeds"] == [0, 1, 2] and cell["adamw_gap"] == pytest.approx(10.0)
    assert cell["diff"] == pytest.approx(100 * s2d_gain + 0.1)
    assert "W4A4 static" in vit_static.table(tmp_path)
    text = " ".join(vit_static.reading(tmp_path))
    assert ("reached at W4A4 static" in text) == (s2d_gain > 0)
    assert "where AdamW loses ≥ 5 points" in text


def test_measure_model_measures_only_the_cells_a_ptq_json_lacks(tmp_path, monkeypatch):
    import importlib
    from pathlib import Path

    import s2d.assets

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    exp = importlib.import_module("exp_vit_static")
    old = [c for c in vit_static.CELLS if "+repq" not in c]
    folder = tmp_path / "ft-adamw-s0"
    folder.mkdir()
    before = {"FP": 0.9, "max_abs": {"residual": 31.0, "blocks": []}, "configs": {c: {"old": True} for c in old[1:]},
              "seconds": 10.0, **{c: 0.5 for c in old[1:]}}
    (folder / "ptq.json").write_text(json.dumps(before))
    asked, loads = [], []

    def fake_measure(model, data, cells):
        asked.append(tuple(cells))
        return {"FP": 0.1, "max_abs": {"residual": 1.0}, "configs": {c: {"new": True} for c in cells if c != "FP"},
                "seconds": 5.0, **{c: 0.25 for c in cells if c != "FP"}}

    monkeypatch.setattr(exp, "measure", fake_measure)
    monkeypatch.setattr(s2d.assets, "load_model", lambda spec: loads.append(spec) or ("model", None))
    exp.measure_model(folder, data=None)
    after = json.loads((folder / "ptq.json").read_text())
    repq = tuple(c for c in vit_static.CELLS if "+repq" in c)
    assert asked == [repq] and len(repq) == 4
    assert after["FP"] == 0.9 and after["max_abs"] == {"residual": 31.0, "blocks": []}  # kept, not re-measured
    assert all(after[c] == 0.5 and after["configs"][c] == {"old": True} for c in old[1:])
    assert all(after[c] == 0.25 and after["configs"][c] == {"new": True} for c in repq)
    assert after["seconds"] == 15.0
    exp.measure_model(folder, data=None)  # complete now: nothing loaded, nothing measured
    assert len(loads) == 1 and len(asked) == 1


def test_measure_model_adds_the_per_block_record_to_an_older_complete_ptq_json(tmp_path, monkeypatch):
    import importlib
    from pathlib import Path

    import s2d.assets

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    exp = importlib.import_module("exp_vit_static")
    folder = tmp_path / "ft-adamw-s0"
    folder.mkdir()
    before = {"FP": 0.9, "max_abs": {"residual": 31.0}, **{c: 0.5 for c in vit_static.CELLS[1:]}}
    (folder / "ptq.json").write_text(json.dumps(before))
    blocks = [{"max": 31.0, "median": 2.0}]

    class Data:
        def batches(self, model):
            return {}, {"pixel_values": "calib"}

    monkeypatch.setattr(exp, "measure", lambda *a: pytest.fail("no cell is missing: nothing to measure"))
    monkeypatch.setattr(exp, "activation_maxima", lambda model, pixels: {"residual": 0.0, "blocks": blocks}
                        if pixels == "calib" else pytest.fail("not the calibration images"))
    monkeypatch.setattr(s2d.assets, "load_model", lambda spec: (type("M", (), {"eval": lambda self: self})(), None))
    exp.measure_model(folder, Data())
    after = json.loads((folder / "ptq.json").read_text())
    assert after == {**before, "max_abs": {"residual": 31.0, "blocks": blocks}}  # only the blocks are new


@torch.no_grad()
def test_activation_maxima_records_each_blocks_max_and_median(monkeypatch):
    import importlib
    from pathlib import Path

    import s2d.assets

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    exp = importlib.import_module("exp_vit_static")
    model, _ = s2d.assets.load_model("tiny:vit")
    model.eval()
    c, n = model.config.num_channels, model.config.image_size
    pixels = torch.randn(3, c, n, n, generator=torch.Generator().manual_seed(0))
    outs = model(pixel_values=pixels, output_hidden_states=True).hidden_states[1:]  # each block's output
    got = exp.activation_maxima(model, pixels)
    assert len(got["blocks"]) == len(outs) == model.config.num_hidden_layers
    for block, out in zip(got["blocks"], outs, strict=True):
        assert block["max"] == pytest.approx(float(out.abs().max()))
        assert block["median"] == pytest.approx(float(out.abs().flatten().sort().values[(out.numel() - 1) // 2]))
    assert got["residual"] == pytest.approx(max(b["max"] for b in got["blocks"]))


def test_measure_curve_gives_old_points_just_the_cells_they_lack(tmp_path, monkeypatch):
    import importlib
    from pathlib import Path

    import s2d.assets
    import s2d.experiments.record

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    exp = importlib.import_module("exp_vit_static")
    folder = tmp_path / "pretrain-long"
    for step in (10, 20):
        (folder / "checkpoints" / f"step-{step}").mkdir(parents=True)
    old = [c for c in vit_static.CURVE_CELLS if "+resid" not in c]
    point = {"step": 10, "FP": 0.9, "max_abs": {"residual": 31.0}, "configs": {c: {} for c in old[1:]},
             **{c: 0.5 for c in old[1:]}}
    (folder / "curve.json").write_text(json.dumps({"points": {"10": point}}))
    asked = []

    def fake_measure(model, data, cells):
        asked.append(tuple(cells))
        return {"FP": 0.1, "max_abs": {"residual": 1.0}, "configs": {c: {"new": True} for c in cells if c != "FP"},
                **{c: 0.25 for c in cells if c != "FP"}}

    monkeypatch.setattr(exp, "measure", fake_measure)
    monkeypatch.setattr(s2d.assets, "load_model", lambda spec: ("model", None))
    monkeypatch.setattr(s2d.experiments.record, "setting", lambda folder, key: "scratch:vit-fmnist-deep")
    monkeypatch.setattr("safetensors.torch.load_model", lambda model, path: None)
    exp.measure_curve(folder, data=None)
    resid = tuple(c for c in vit_static.CURVE_CELLS if "+resid" in c)
    assert asked == [resid, vit_static.CURVE_CELLS] and len(resid) == 3
    points = json.loads((folder / "curve.json").read_text())["points"]
    assert points["10"]["FP"] == 0.9 and points["10"]["max_abs"] == {"residual": 31.0}  # kept
    assert all(points["10"][c] == 0.5 for c in old[1:]) and all(points["10"][c] == 0.25 for c in resid)
    assert points["20"]["FP"] == 0.1 and points["20"]["step"] == 20
    exp.measure_curve(folder, data=None)  # complete: nothing measured again
    assert len(asked) == 2


def test_later_stages_are_the_s2d_pretraining_then_fine_tunes_then_qat_each_once(tmp_path, monkeypatch):
    import argparse
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    exp = importlib.import_module("exp_vit_static")
    monkeypatch.setattr(exp, "select_tau", lambda root: {"reg_option": "tau=0.9"})
    args = argparse.Namespace(seeds=[0, 1], lr=2e-3, ft_lr=3e-4, curve_points=4, model=exp.MODEL, levers=[],
                              levers_only=False)
    plan = exp.later_stages(tmp_path, args, spe=10, steps=40)
    names = [n for n, _, _ in plan]
    assert names == ["pretrain-long-s2d", "ft-adamw-s0", "ft-s2d-s0", "ft-adamw-s1", "ft-s2d-s1",
                     "qat-adamw-s0", "qat-s2d-s0", "qat-adamw-s1", "qat-s2d-s1"]
    kinds = dict((n, k) for n, _, k in plan)
    assert kinds["pretrain-long-s2d"] == {"curve": True} and kinds["qat-s2d-s1"] == {"qat": True}
    assert kinds["ft-adamw-s0"] == {"qat": False}
    cmds = {n: c for n, c, _ in plan}
    assert all(cmds[n][cmds[n].index("--out") + 1] == str(tmp_path / n) for n in names)  # each its own folder
    assert "tau=0.9" in cmds["ft-s2d-s1"] and "tau=0.9" in cmds["qat-s2d-s0"] and "tau=0.9" not in cmds["ft-adamw-s0"]
    assert "--qat" in cmds["qat-adamw-s1"] and "--qat" not in cmds["ft-s2d-s0"]
    assert cmds["pretrain-long-s2d"][cmds["pretrain-long-s2d"].index("--steps") + 1] == "40"


def test_a_stage_held_by_another_process_is_skipped_and_runs_once_free(tmp_path, monkeypatch):
    import fcntl
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    exp = importlib.import_module("exp_vit_static")
    ran = []
    monkeypatch.setattr(exp, "run", lambda cmd, log: ran.append(cmd))
    monkeypatch.setattr(exp, "measure_model", lambda folder, data, cells: ran.append("measured"))
    (tmp_path / ".locks").mkdir()
    # The holder is another process, as in a --jobs run beside a --stage one (flock is per open file).
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(tmp_path / '.locks' / 'ft-adamw-s0')!r}, 'w')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert exp.stage(tmp_path, "ft-adamw-s0", ["train"], data=None) is False
        assert ran == []
    finally:
        holder.kill()
        holder.wait()
    assert exp.stage(tmp_path, "ft-adamw-s0", ["train"], data=None) is True  # the dead holder's lock is gone
    assert ran == [["train"], "measured"]
    with (tmp_path / ".locks" / "ft-adamw-s0").open("w") as f:  # and this process released its own
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_reading_gives_each_arms_outliers_and_s2ds_paired_change(tmp_path):
    for seed, (adamw, s2d) in enumerate(((100.0, 80.0), (110.0, 99.0), (90.0, 72.0))):
        base = {c: 0.80 for c in vit_static.CELLS}
        _write(tmp_path, f"ft-adamw-s{seed}", base | {"max_abs": {"residual": adamw, "linear_input": 10.0}})
        _write(tmp_path, f"ft-s2d-s{seed}", base | {"max_abs": {"residual": s2d, "linear_input": 9.0}})
    line = next(t for t in vit_static.reading(tmp_path) if t.startswith("Outliers the quantizers meet"))
    # residual means 100 and 83.7; the per-seed changes -20%, -10%, -20%: mean -16.67
    assert "residual stream AdamW 100, AdamW+S2D 83.7 (S2D's paired change in %: -16.67 [" in line
    assert "Linear inputs 10 and 9." in line
    for seed in range(3):  # with each block output's max and median recorded, their ratio joins the sentence
        for arm, (peak, median) in (("ft-adamw", (100.0, 10.0)), ("ft-s2d", (80.0, 10.0))):
            path = tmp_path / f"{arm}-s{seed}" / "ptq.json"
            record = json.loads(path.read_text())
            record["max_abs"]["blocks"] = [{"max": peak, "median": median}, {"max": peak / 2, "median": median}]
            path.write_text(json.dumps(record))
    line = next(t for t in vit_static.reading(tmp_path) if t.startswith("Outliers the quantizers meet"))
    assert line.endswith("Linear inputs 10 and 9; the residual stream's max / median |x| (mean over the block "
                         "outputs) 7.5 and 6.")


def test_reading_says_why_when_no_static_cell_costs_enough(tmp_path):
    for seed in range(3):
        base = {c: 0.80 for c in vit_static.CELLS} | {"W4A4 static": 0.79 - 0.001 * seed}
        _write(tmp_path, f"ft-adamw-s{seed}", base)
        _write(tmp_path, f"ft-s2d-s{seed}", base | {"W4A4 static": 0.795 - 0.0001 * seed})
    _write(tmp_path, "pretrain-long", {"FP": 0.8, "max_abs": {"residual": 100.0, "linear_input": 12.5,
                                                               "by_role": {"fc2": 12.5, "q": 4.0},
                                                               "norm_cap": {"attn_in": 11.3, "mlp_in": 12.04}}})
    text = " ".join(vit_static.reading(tmp_path))
    assert "(by norm): attn_in 4 of at most 11.3." in text and "No cap binds" in text  # mlp_in feeds no role here
    held = {"residual": 100.0, "linear_input": 12.5, "by_role": {"fc2": 12.5, "q": 10.0, "fc1": 3.0},
            "norm_cap": {"attn_in": 11.3, "mlp_in": 12.04}}
    assert "The cap binds at attn_in: a wider model" in vit_static._cap_words(held)
    assert vit_static.cap_use(held) == [("attn_in", 10.0, 11.3), ("mlp_in", 3.0, 12.04)]
    assert "not testable here" in text and "largest gap 1.10, W4A4 static" in text
    assert "residual stream (max |x| 100)" in text and "fc2 12.5, q 4" in text and "about 8× smaller" in text
    assert "beyond the 95% interval at W4A4 static" in text
    assert f"{len(vit_static.CELLS) - 1} quantized cells are compared" in text
    assert "which no quantizer sees" in text  # this pretrain-long record measured no +resid cell


def test_norm_caps_bound_every_layernorm_output_and_are_attained(monkeypatch):
    """The cap sqrt(d-1)*max|gain| + max|bias| against LayerNorm itself: never exceeded, even by a residual outlier
    of 1e4, and reached by the extremal input (one element a, the rest -a/(d-1))."""
    import importlib
    from pathlib import Path

    import torch

    from s2d.arch import describe
    from s2d.assets.tiny import tiny_model

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    exp = importlib.import_module("exp_vit_static")
    model, _ = tiny_model("vit")
    desc = describe(model)
    gen = torch.Generator().manual_seed(0)
    for block in desc.blocks:
        for name in block.norms:
            norm = desc.module(name)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen))
                norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=gen))
    caps = exp.norm_caps(desc)
    assert set(caps) == {"attn_in", "mlp_in"}
    d = model.config.hidden_size
    x = torch.randn(64, d, generator=gen)
    x[:, 3] += 1e4  # a massive residual activation in one channel
    with torch.no_grad():
        seen = {kind: 0.0 for kind in caps}
        for block in desc.blocks:
            for name, kind in block.norms.items():
                norm = desc.module(name)
                seen[kind] = max(seen[kind], float(norm(x).abs().max()))
                i = int(norm.weight.abs().argmax())
                extremal = torch.full((d,), -1.0 / (d - 1))
                extremal[i] = 1.0
                hit = float((norm(1e3 * extremal)[i] - norm.bias[i]).abs())
                assert hit == pytest.approx((d - 1) ** 0.5 * float(norm.weight.abs().max()), rel=1e-4)
    for kind, cap in caps.items():
        assert seen[kind] <= cap + 1e-4


def test_reading_follows_the_residual_quantized_gap_along_a_pretraining(tmp_path):
    def point(step, fp, resid_acc, residual):
        return {"step": step, "FP": fp, "W6A6 static": fp, "W4A4 static": fp - 0.01, "W4A4 static+resid": resid_acc,
                "max_abs": {"residual": residual, "linear_input": 5.0}}

    (tmp_path / "pretrain-long").mkdir()
    (tmp_path / "pretrain-long" / "curve.json").write_text(json.dumps(
        {"points": {"10": point(10, 0.70, 0.69, 40.0), "30": point(30, 0.85, 0.78, 96.0)}}))
    line = next(t for t in vit_static.reading(tmp_path) if t.startswith("AdamW pre-training, step 10 → 30"))
    assert "residual max |x| 40 → 96, FP − W4A4 static+resid 1.00 → 7.00" in line
    old = point(30, 0.85, 0.78, 96.0)
    del old["W4A4 static+resid"]  # a curve from before the +resid cells: the sentence says nothing of them
    assert vit_static._resid_growth(point(10, 0.7, 0.69, 40.0), old) == ""


def test_the_qat_note_follows_finished_qat_arms(tmp_path):
    _write(tmp_path, "ft-adamw-s0", {c: 0.8 for c in vit_static.CELLS})
    assert vit_static.notes(tmp_path)[-1].startswith("QAT arms: none has finished")
    (tmp_path / "qat-adamw-s0").mkdir()
    (tmp_path / "qat-adamw-s0" / "qat.json").write_text(json.dumps({c: 0.8 for c in vit_static.QAT_CELLS}))
    assert vit_static.notes(tmp_path)[-1] == vit_static.QAT_NOTE
