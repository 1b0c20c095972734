"""The per-tensor SmolLM2 study (bench/smollm2_per_tensor.py): each cell's QuantConfig field by field, and the table
and reading read back from synthetic result files (no model is loaded)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from s2d.experiments import smollm2_per_tensor as spt

BENCH = Path(__file__).resolve().parents[1] / "bench"
S2D = "s2d-decoupled-outliers"


@pytest.mark.parametrize("cell, w, a, static, smooth", [
    ("W8A8 O1", "per_tensor", "per_token", False, 0.5),
    ("W8A8 O2", "per_tensor", "per_tensor", False, 0.5),
    ("W8A8 O3", "per_tensor", "per_tensor", True, 0.5),
    ("W8A8 per-token", "per_tensor", "per_token", False, None),
    ("W8A8 per-tensor dynamic", "per_tensor", "per_tensor", False, None),
    ("W8A8 per-tensor static", "per_tensor", "per_tensor", True, None),
    ("W6A6 per-token", "per_channel", "per_token", False, None),
    ("W6A6 per-tensor dynamic", "per_channel", "per_tensor", False, None),
    ("W6A6 per-tensor static", "per_channel", "per_tensor", True, None),
    ("W6A6 smooth per-tensor static", "per_channel", "per_tensor", True, 0.5),
])
def test_cell_configs(cell, w, a, static, smooth):
    q = spt.CELLS[cell].config()
    bits = int(cell[1])
    assert (q.w_bits, q.a_bits) == (bits, bits)
    assert (q.w_granularity, q.a_granularity, q.a_static, q.smooth_alpha) == (w, a, static, smooth)
    assert (q.method, q.rotate, q.w_symmetric, q.a_symmetric, q.a_clip, q.kv_bits) == ("rtn", False, True, True, 1.0,
                                                                                        None)
    assert q.needs_calibration == (static or smooth is not None)


def test_every_per_tensor_cell_has_a_per_token_control_that_differs_only_in_activations():
    for name, cell in spt.CELLS.items():
        if cell.a != "per_tensor":
            assert cell.control is None
            continue
        q, ctl = cell.config().to_dict(), spt.CELLS[cell.control].config().to_dict()
        assert ctl["a_granularity"] == "per_token", name
        assert {k for k in q if q[k] != ctl[k]} <= {"a_granularity", "a_static"}, name


def test_best_cell_is_the_recipe():
    q = spt.CELLS[spt.BEST].config()
    assert (q.w_bits, q.a_bits, q.method, q.rotate, q.rotate_heads, q.grid, q.w_observer) == \
        (4, 4, "gptq", True, True, "full", "mse")
    assert (q.a_granularity, q.a_group_size, q.a_symmetric, q.a_clip_search, q.smooth_alpha, q.kv_bits) == \
        ("per_group", 32, False, True, None, None)


# Synthetic perplexities: model -> cell -> ppl (None: the cell overflowed). At 100 steps S2D beats AdamW at O2
# (-20%) but not at its per-token control O1 (+5%); at 300 steps it is worse at O2; on `best` it helps at 100 only.
PPL = {
    "start": {"FP": 20.0, "W8A8 O1": 21.0, "W8A8 O2": 40.0, "W4A4 best": 30.0},
    "adamw-steps100-s0": {"FP": 20.0, "W8A8 O1": 22.0, "W8A8 O2": 50.0, "W8A8 O3": 300.0, "W4A4 best": 40.0},
    f"{S2D}-steps100-s0": {"FP": 21.0, "W8A8 O1": 23.1, "W8A8 O2": 40.0, "W8A8 O3": None, "W4A4 best": 30.0},
    "adamw-steps300-s0": {"FP": 19.0, "W8A8 O1": 20.0, "W8A8 O2": 30.0, "W4A4 best": 25.0},
    f"{S2D}-steps300-s0": {"FP": 19.0, "W8A8 O1": 20.0, "W8A8 O2": 36.0, "W4A4 best": 25.5},
}
PEAK = {"start": 3e4, "adamw-steps100-s0": 2.9e4, f"{S2D}-steps100-s0": 2.3e4, "adamw-steps300-s0": 3e4,
        f"{S2D}-steps300-s0": 1.5e4}


def build(root: Path) -> Path:
    for name, cells in PPL.items():
        folder = root / name
        for cell, value in cells.items():
            rec = {"model": name, "start_model": "smollm2-135m", "cell": cell, "ppl": value,
                   "eval_config": {"seq_lens": [128], "ppl_tokens": 8192},
                   "calibration": {"n_samples": 32, "seq_len": 512}}
            if value is None:
                rec["error"] = "the ppl:wiki@128 perplexity is NaN/Inf"
            path = folder / "cells" / spt.cell_file(cell)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec))
        (folder / "residual.json").write_text(json.dumps({"max_abs": PEAK[name], "loudest_positions": [0, 1, 4],
                                                          "max_abs_elsewhere": 50.0}))
        if name != "start":
            steps = int(name.split("-steps")[1].split("-")[0])
            (folder / "finetune").mkdir()
            (folder / "finetune" / "config.yaml").write_text(yaml.safe_dump(
                {"command": "finetune", "argv": ["finetune"], "config": {"steps": steps, "lr": 5e-5}}))
    (root / "unrelated").mkdir()  # a folder without results is not a model
    return root


def test_models_and_pairs(tmp_path):
    root = build(tmp_path)
    assert list(spt.models(root)) == ["start", "adamw-steps100-s0", f"{S2D}-steps100-s0", "adamw-steps300-s0",
                                      f"{S2D}-steps300-s0"]
    assert [(steps, seed, a.name, s.name) for steps, seed, a, s in spt.pairs(root)] == [
        (100, 0, "adamw-steps100-s0", f"{S2D}-steps100-s0"), (300, 0, "adamw-steps300-s0", f"{S2D}-steps300-s0")]
    assert spt.change(root / f"{S2D}-steps100-s0", root / "adamw-steps100-s0", "W8A8 O2") == pytest.approx(-0.2)
    assert spt.change(root / f"{S2D}-steps100-s0", root / "adamw-steps100-s0", "W8A8 O3") is None  # overflowed


def test_table_numbers(tmp_path):
    text = spt.table(build(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| W8A8 O2 | per-tensor dynamic | per-tensor RTN | 0.5 | W8A8 O1 | 40 (2.00×) | 50 (2.50×) | 40 (1.90×) " \
           "| 30 (1.58×) | 36 (1.89×) | -20.0% | +20.0% |" == rows["W8A8 O2"]
    assert "| 300 (15.00×) | NaN/Inf | - | - | - | - |" in rows["W8A8 O3"]
    assert rows["W8A8 O1"].endswith("| +5.0% | +0.0% |")
    assert "| W4A4 best | per-token groups of 32 | recipe `best` | - | - |" in rows["W4A4 best"]
    assert "W6A6 per-token" not in rows  # no model measured it
    assert "| adamw-steps100-s0 | 100 | 2.9e+04 | 0, 1, 4 | 50 | - |" in text
    assert f"| {S2D}-steps300-s0 | 300 | 1.5e+04 | 0, 1, 4 | 50 | -50.0% |" in text


def test_reading_states_the_direction(tmp_path):
    lines = spt.reading(build(tmp_path))
    at100 = [line for line in lines if line.startswith("At 100 steps")]
    at300 = [line for line in lines if line.startswith("At 300 steps")]
    assert "S2D's residual max |x| is 2.3e+04 against AdamW's 2.9e+04 (-21%); FP perplexity +5.0%." in at100[0]
    assert "lower perplexity than AdamW in 1 of 1 per-tensor cells: W8A8 O2 -20.0% (per-token control +5.0%). " \
           "Higher in 0: none." in at100[1]
    assert "in 1 of 1: W8A8 O2 by 25.0 points." in at100[2]
    assert "lower perplexity than AdamW in 0 of 1 per-tensor cells: none. Higher in 1: W8A8 O2 +20.0%" in at300[1]
    assert "in 0 of 1: none." in at300[2]
    best = [line for line in lines if line.startswith("On top of `best`")]
    assert best == ["On top of `best` W4A4 at 100 steps (seed 0): 30 against AdamW's 40 (-25.0%): S2D adds to the "
                    "working stack.",
                    "On top of `best` W4A4 at 300 steps (seed 0): 25.5 against AdamW's 25 (+2.0%): no clear change "
                    "(within ±5%)."]


def test_reading_flags_cells_where_adamw_is_broken(tmp_path):
    root = build(tmp_path)
    s2d = root / f"{S2D}-steps100-s0" / "cells" / spt.cell_file("W8A8 O3")
    s2d.write_text(json.dumps({**json.loads(s2d.read_text()), "ppl": 150.0}))
    line = [x for x in spt.reading(root) if "max-set scale" in x and x.startswith("At 100")][0]
    assert "in 2 of 2: W8A8 O2 by 25.0 points; W8A8 O3 by 55.0 points." in line
    assert "broken) in W8A8 O3" in line


def test_make_results_writes_the_section(tmp_path):
    build(tmp_path / "runs" / "smollm2-per-tensor")
    out, readme = tmp_path / "docs" / "results.md", tmp_path / "README.md"
    out.parent.mkdir()
    out.write_text("# Results\n<!-- section:lowrank -->\n## Low-rank\nkept as it was\n")
    readme.write_text("# s2d\n<!-- results:start -->\n<!-- section:lowrank -->\nold\n<!-- results:end -->\n")
    done = subprocess.run([sys.executable, str(BENCH / "make_results.py"), "--only", "smollm2_per_tensor", "--runs",
                           str(tmp_path / "runs"), "--out", str(out), "--readme", str(readme)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "<!-- section:smollm2_per_tensor -->" in text and "kept as it was" in text
    assert "fine-tuned from it by `bench/exp_smollm2_s2d.py`'s finetune command (100 / 300 steps, lr 5e-5)" in text
    assert "(calibration 32×512 wiki-train tokens) and scores wiki-test ppl@128 on the first 8,192 tokens" in text
    assert "S2D adds to the working stack" in text and "S2D adds to the working stack" in readme.read_text()
