"""s2d.experiments.vit_width: the width probe's reading and results section, from a synthetic run folder."""

from __future__ import annotations

import json

import yaml

from s2d.experiments import vit_width
from s2d.experiments.results import Results


def _point(fp: float, w4: float, residual: float, linear: float) -> dict:
    return {"FP": fp, "W6A6 static": fp - 0.001, "W6A6 static+reparam": fp, "W4A4 static": w4,
            "W4A4 static+reparam": fp - 0.002, "W4A4 dynamic": fp - 0.5, "n_test": 100,
            "max_abs": {"residual": residual, "linear_input": linear, "by_role": {"fc2": linear, "q": 3.0},
                        "norm_cap": {"attn_in": 16.0, "mlp_in": 17.5}}}


def _root(tmp_path, final_w4: float):
    root = tmp_path / vit_width.ROOT
    long = root / "pretrain-long"
    (long / "model").mkdir(parents=True)
    (root / "plan.json").write_text(json.dumps({"command": "python bench/exp_vit_static.py --pretrain-only",
                                                "smoke": False, "model": "scratch:vit-fmnist-wide"}))
    (long / "model" / "config.json").write_text(json.dumps({"num_hidden_layers": 12, "hidden_size": 256,
                                                            "patch_size": 7}))
    (long / "config.yaml").write_text(yaml.safe_dump({"config": {"steps": 30, "lr": 2e-3, "weight_decay": 0.0,
                                                                 "batch_size": 128}}))
    (long / "metrics.json").write_text(json.dumps({"steps": 30, "seconds": 12.0}))
    (long / "ptq.json").write_text(json.dumps(_point(0.80, final_w4, 200.0, 20.0)))
    points = {"10": {"step": 10, **_point(0.70, 0.69, 50.0, 8.0)},
              "30": {"step": 30, **_point(0.80, final_w4, 200.0, 20.0)}}
    (long / "curve.json").write_text(json.dumps({"points": points}))
    return root


def test_reading_says_whether_the_condition_is_met(tmp_path):
    root = _root(tmp_path, final_w4=0.72)
    text = " ".join(vit_width.reading(root))
    assert "largest per-tensor static gap to FP is 8.00 points (W4A4 static)" in text and "is met" in text
    assert "step 10 → 30" in text and "Linear-input max |x| 8 → 20" in text and "FP − W4A4 static 1.00 → 8.00" in text
    assert "LayerNorm caps: attn_in 16, mlp_in 17.5" in text
    assert "attn_in 3 of 16 (19%)" in text and "No cap binds" in text
    small = " ".join(vit_width.reading(_root(tmp_path / "b", final_w4=0.79)))
    assert "1.00 points (W4A4 static)" in small and "is not met" in small


def test_section_is_written_or_listed_missing(tmp_path):
    _root(tmp_path, final_w4=0.72)
    r = Results(tmp_path, tmp_path / "figures", tmp_path / "bench")
    vit_width.vision_width(r)
    body = "\n".join(r.parts)
    assert "d=256" in body and "30 steps" in body and "--pretrain-only" in body and "| AdamW | 30 |" in body
    empty = Results(tmp_path / "none", tmp_path / "figures", tmp_path / "bench")
    vit_width.vision_width(empty)
    assert empty.parts == [] and empty.missing == [str(tmp_path / "none" / vit_width.ROOT)]
