"""s2d.experiments.vit_static: the cells' configs, and the table and reading built from synthetic run folders."""

from __future__ import annotations

import json

import pytest

from s2d.experiments import vit_static


def test_cell_configs():
    static = vit_static.quant_config("W5A5 static+reparam")
    assert (static.w_bits, static.a_bits, static.a_static, static.a_granularity, static.ln_reparam) == \
        (5, 5, True, "per_tensor", True)
    assert not vit_static.quant_config("W4A4 static").ln_reparam
    dynamic = vit_static.quant_config("W4A4 dynamic")
    assert (dynamic.a_static, dynamic.a_granularity) == (False, "per_token")


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
