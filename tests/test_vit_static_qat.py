"""The QAT arms of s2d.experiments.vit_static: their flags, and their rows in the summary, table and reading."""

from __future__ import annotations

import json

import pytest

from s2d.experiments import vit_static


def test_qat_args_make_a_per_tensor_static_w4a4_config():
    from s2d.cli import build_parser, train_config

    config = train_config(build_parser().parse_args(["finetune", "m", *vit_static.qat_args()]))
    q = config.qat_config()
    assert (q.w_bits, q.a_bits, q.a_static, q.a_granularity, q.a_observer) == (4, 4, True, "per_tensor", "minmax")
    assert not config.qat_fixed_act_scales  # the scales are learned


def _write(root, name, file, acc):
    (root / name).mkdir(parents=True)
    (root / name / file).write_text(json.dumps({"n_test": 100, **acc}))


@pytest.mark.parametrize("qat_seeds", [(0, 1, 2), ()])
def test_qat_rows_in_summary_table_and_reading(tmp_path, qat_seeds):
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        base = {c: 0.80 + noise for c in vit_static.CELLS} | {"W4A4 static": 0.60 + noise}
        _write(tmp_path, f"ft-adamw-s{seed}", "ptq.json", base)
        _write(tmp_path, f"ft-s2d-s{seed}", "ptq.json", base)
    for seed in qat_seeds:
        noise = 0.01 * seed
        qat = {"FP": 0.79 + noise, "W4A4 qat-static": 0.75 + noise, "W4A4 static": 0.65 + noise}
        _write(tmp_path, f"qat-adamw-s{seed}", "qat.json", qat)
        _write(tmp_path, f"qat-s2d-s{seed}", "qat.json", qat | {"W4A4 qat-static": 0.77 + noise + 0.001 * seed})
    s = vit_static.summary(tmp_path)
    assert s["cells"]["W4A4 static"]["diff"] == pytest.approx(0.0)  # the PTQ cells are the ft arms' alone
    cell = s["qat"]["cells"]["W4A4 qat-static"]
    text, table = " ".join(vit_static.reading(tmp_path)), vit_static.table(tmp_path)
    if not qat_seeds:
        assert s["qat"]["paired_seeds"] == [] and cell["diff"] is None
        assert "QAT W4A4" not in table and "QAT W4A4" not in text
        return
    assert s["qat"]["paired_seeds"] == [0, 1, 2]
    assert cell["diff"] == pytest.approx(2.1) and cell["adamw_gap"] == pytest.approx(4.0)
    assert cell["ft-adamw"]["values"] == pytest.approx([75.0, 76.0, 77.0])
    row = next(line for line in table.splitlines() if vit_static.QAT_LABELS["W4A4 qat-static"] in line)
    assert "+2.10 [" in row and "QAT W4A4: 65.8 → 69.7" in row
    assert "QAT W4A4 with learned per-tensor static scales (3 paired seeds)" in text
    assert "S2D better beyond the 95% interval" in text
    assert "static W4A4 PTQ of the plain fine-tunes: AdamW 60.00" in text
