"""docs/results.md regenerates from run folders alone: a tiny tree of them, shaped like the real ones, is written
here (config.yaml + metrics.json of one SmolLM2 experiment run and of the low-rank grid), and every setting the
text states is checked to come from those folders, not from the text (no model is loaded)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from s2d.experiments import results

BENCH = Path(__file__).resolve().parents[1] / "bench"
README = "# s2d\n\n## Results\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\n## Layout\n"
S2D = ["--reg", "s2d", "--reg-option", "refresh_every=25"]
ARMS = {"adamw": ["--reg", "none"],  # the SmolLM2 arms of the fixture, as bench/exp_smollm2_s2d.py runs them
        "s2d-decoupled-outliers": [*S2D, "--reg-option", "form=decoupled", "--reg-option", "lam=2.0",
                                   "--reg-option", "pcdr_rows=outliers", "--reg-option", "tau=0.8"]}
CELLS = {"dense": ("svd", 1.0, None), "svd-0.8": ("svd", 0.8, None), "rom-0.8": ("rom", 0.8, None),
         "rom+search-0.8": ("rom", 0.8, "ppl")}  # low-rank cells: method, keep, search


def write_run(folder: Path, command: str, config: dict, argv: list[str], metrics: dict, threads: int = 2) -> Path:
    """One run folder as `s2d.runs.RunFolder` leaves it: config.yaml, then metrics.json once finished."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "argv": [command, *argv], "seed": config.get("seed", 0), "config": config,
              "versions": {"s2d": "0.1.0"}, "threads": threads, "created": "2025-01-01T00:00:00"}
    (folder / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _ppl(value: float) -> dict:
    return {"eval": {"ppl:wiki@128": {"ppl": value, "n_tokens": 8128, "n_windows": 64}}}


def smollm2_arm(root: Path, arm: str, seed: int, scale: float, steps: int = 100, lr: float = 5e-5,
                batch: int = 2, seq_len: int = 256, ppl_tokens: int = 8192) -> Path:
    """One arm of bench/exp_smollm2_s2d.py: finetune (not for "start"), quant, quant-pt, eval and diagnose."""
    folder = root / f"{arm}-s{seed}"
    model = "smollm2-135m" if arm == "start" else str(folder / "finetune" / "model")
    writer = "model.layers.11.mlp.down_proj"
    if arm != "start":
        reg = ARMS[arm]
        options = dict(o.split("=", 1) for o in reg[3::2])
        options = {k: yaml.safe_load(v) for k, v in options.items()}  # as `s2d finetune --reg-option` reads them
        refreshes = [{"step": s, "selected": {writer: 1}} for s in range(0, steps, 25)] if "s2d" in reg else []
        write_run(folder / "finetune", "finetune",
                  {"model": "smollm2-135m", "task": "lm", "steps": steps, "lr": lr, "batch_size": batch,
                   "seq_len": seq_len, "seed": seed, "reg": reg[1], "reg_config": options},
                  ["smollm2-135m", "--task", "lm", *reg, "--steps", str(steps), "--lr", str(lr), "--batch-size",
                   str(batch), "--seq-len", str(seq_len), "--seed", str(seed)],
                  {"steps": steps, "seconds": 300.0 * scale, "refreshes": refreshes,
                   "history": [{"step": 0, "sigma_max": 28.0}, {"step": steps, "sigma_max": 28.0 / scale}]},
                  threads=1)
    cells = {f"{s} {m}": 22.0 * scale * (1 + 9 * (s == "W4A4")) * (1.5 if m == "rtn" else 1.1)
             for s in ("W8A8", "W6A6", "W4A4") for m in ("rtn", "rotate+rtn", "smooth+rtn")}
    quant = {"model": model, "schemes": ["W8A8", "W6A6", "W4A4"], "methods": ["rtn", "rotate+rtn", "smooth+rtn"],
             "eval_seq_len": 128, "ppl_tokens": ppl_tokens, "overrides": {}}
    write_run(folder / "quant", "quantize", quant, [model, "--sweep"],
              {"results": {"FP": _ppl(22.0 * scale),
                           **{k: {"config": {"a_granularity": "per_token"}, **_ppl(v)} for k, v in cells.items()}}})
    write_run(folder / "quant-pt", "quantize", {**quant, "overrides": {"a_granularity": "per_tensor"}},
              [model, "--scheme", "W4A4"],
              {"results": {"FP": _ppl(22.0 * scale), "W4A4 rtn": {"config": {"a_granularity": "per_tensor"},
                                                                  **_ppl(2e6 * scale)}}})
    write_run(folder / "eval", "eval", {"model": model, "tasks": ["polarity", "analogy-mc"]}, [model],
              {"tasks": {"polarity": {"acc": 0.7 * scale}, "analogy-mc": {"acc": 0.8}}})
    peak = 2.9e4 / scale
    write_run(folder / "diagnose", "diagnose", {"model": model, "n_samples": 16}, [model],
              {"severity": {"max_abs": peak, "massive_count": 300, "sigma1_max": 28.5 / scale},
               "linears": [{"name": writer, "sigma1": 28.5 / scale, "pcdr": [0.59, 0.6, 0.62],
                            "output": {"max_abs": peak}}],
               "residual": [{"block": b, "max_abs": peak * (b + 1) / 30} for b in range(30)]})
    return folder


def lowrank_cell(root: Path, name: str, ppl: float, n_samples: int = 512, tolerance: float = 1.005) -> Path:
    """One cell of bench/lowrank_grid.py: an `s2d compress` run folder."""
    method, keep, search = CELLS[name]
    lowrank = {"method": method, "keep": keep, "search": search, "tolerance": tolerance, "search_samples": 16,
               "n_samples": n_samples, "seq_len": 128, "seed": 0}
    compression = {"summary": {"fraction_kept": keep, "block_linear_fraction_kept": keep - 0.05},
                   "seconds": 100.0, "ranks": {"model.layers.0.mlp.up_proj": 64}}
    if search:
        compression["search"] = {"ppl_ref": 26.9, "ppl_final": ppl * 0.9, "tolerance": tolerance,
                                 "layers_processed": 100, "target_reached": True}
    evals = {"ppl:wiki@128": {"ppl": ppl, "n_tokens": 16256}, "analogy-mc": {"acc": 0.6 + 10 / ppl, "n": 500},
             "polarity": {"acc": 0.55, "n": 200}, "wiki-cloze": {"acc": 0.7 + 5 / ppl, "n": 500}}
    return write_run(root / name, "compress", {"model": "smollm2-135m", "lowrank": lowrank,
                                               "eval": ["ppl:wiki", *list(evals)[1:]], "ppl_tokens": 16384,
                                               "merge": False},
                     ["smollm2-135m", "--method", method, "--keep", str(keep), "--limit", "500"],
                     {"compression": compression, "eval": evals})


def build_tree(base: Path, lr: float = 5e-5, batch: int = 2, n_samples: int = 512, tolerance: float = 1.005) -> Path:
    """A checkout's worth of run folders for the `experiments` and `lowrank` sections, plus README and docs/."""
    root = base / "runs" / "exp-smollm2"
    smollm2_arm(root, "start", 0, 1.2)
    for arm, scale in (("adamw", 1.0), ("s2d-decoupled-outliers", 1.05)):
        smollm2_arm(root, arm, 0, scale, lr=lr, batch=batch)
    for name, ppl in (("dense", 26.81), ("svd-0.8", 5.2e5), ("rom-0.8", 162.0), ("rom+search-0.8", 64.35)):
        lowrank_cell(base / "runs" / "lowrank-grid", name, ppl, n_samples=n_samples, tolerance=tolerance)
    (base / "README.md").write_text(README)
    (base / "docs").mkdir(exist_ok=True)
    return base


def regenerate(base: Path, *only: str) -> tuple[str, str]:
    """Run the results writer on the tree; returns (results.md, README)."""
    results.main(["--runs", str(base / "runs"), "--out", str(base / "docs" / "results.md"), "--bench-out",
                  str(base / "bench" / "out"), "--readme", str(base / "README.md"),
                  *(("--only", *only) if only else ())])
    return (base / "docs" / "results.md").read_text(), (base / "README.md").read_text()


def section(text: str, name: str) -> str:
    return results.previous_sections(text)[name]


@pytest.fixture
def no_figures(monkeypatch):
    """Skip drawing the SmolLM2 figures (most of a regeneration's time); the first test draws them."""
    monkeypatch.setattr(results.smollm2, "figures", lambda root, out, prefix: [])


def test_results_regenerate_from_the_run_folders(tmp_path):
    text, readme = regenerate(build_tree(tmp_path))
    exp = section(text, "experiments")
    assert "Every arm: 100 steps of AdamW at lr 5e-5, batch 2×256 wiki-train tokens" in exp
    assert "quantized cells score wiki-test ppl@128 on 8,192 tokens (per-token activations unless marked)" in exp
    assert ("`s2d-decoupled-outliers-s0`: `--reg s2d --reg-option refresh_every=25 --reg-option form=decoupled "
            "--reg-option lam=2.0 --reg-option pcdr_rows=outliers --reg-option tau=0.8`") in exp
    assert "| adamw-s0 | 22 | 33 |" in exp  # the fixture's FP and W8A8 RTN perplexity, and train seconds
    assert "| 300 (1 thread) |" in exp
    low = section(text, "lowrank")
    assert ("Calibration 512×128 wiki-train tokens; wiki-test ppl@128 on the first 16,384 tokens; zero-shot tasks on "
            "their first 500 examples (polarity has 200); `rom+search` is the perplexity search (16×128 "
            "wiki-validation tokens, tolerance 1.005 per layer)") in low
    assert "| rom-0.8 | 0.8 | 0.75 | 162 |" in low
    assert "ppl_ref · 1.005^(Linears walked)" in section(text, "lowrank_search")
    for name in ("experiments", "lowrank"):  # the headline parts reach the README's results block
        assert f"<!-- section:{name} -->" in readme
    assert readme.startswith("# s2d\n\n## Results\n\n<!-- results:start -->\n") and readme.endswith("## Layout\n")
    assert "## Not yet run" in text and "exp-vit" in text  # the sections without run folders are listed, not typed
    assert (tmp_path / "docs" / "figures" / "exp-smollm2-max.png").is_file()


def test_settings_are_read_not_typed(tmp_path, no_figures):
    """Other settings in the runs' config.yaml: the regenerated text follows them."""
    before, _ = regenerate(build_tree(tmp_path / "a"))
    after, _ = regenerate(build_tree(tmp_path / "b", lr=2e-5, batch=4, n_samples=256, tolerance=1.01))
    assert "at lr 5e-5, batch 2×256" in before and "at lr 5e-5" not in after
    assert "Every arm: 100 steps of AdamW at lr 2e-5, batch 4×256 wiki-train tokens" in after
    assert "Calibration 256×128 wiki-train tokens" in after and "512×128" not in section(after, "lowrank")
    assert "tolerance 1.01 per layer" in after and "ppl_ref · 1.01^(Linears walked)" in after
    # one config.yaml edited by hand: the arms now differ in lr, and the text says so rather than picking one
    edit(tmp_path / "b" / "runs" / "exp-smollm2" / "adamw-s0" / "finetune", lr=1e-4)
    text, _ = regenerate(tmp_path / "b")
    assert "at lr 2e-5 / 1e-4, batch 4×256" in text


def edit(folder: Path, **config) -> Path:
    """Change (or, with None, remove) settings in a run folder's config.yaml, as a hand edit would."""
    path = folder / "config.yaml"
    record = yaml.safe_load(path.read_text())
    for key, value in config.items():
        if value is None:
            del record["config"][key]
        else:
            record["config"][key] = value
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path


def test_results_regenerate_identically(tmp_path, no_figures):
    base = build_tree(tmp_path)
    first = regenerate(base)
    assert regenerate(base) == first
    # --only rewrites just its sections, here from a changed cell, and keeps the others as they were
    for cell in ("dense", "rom-0.8"):
        edit(base / "runs" / "lowrank-grid" / cell, ppl_tokens=4096)
    text, readme = regenerate(base, "lowrank")
    assert section(text, "lowrank") != section(first[0], "lowrank")
    assert "first 4,096 / 16,384 tokens" in section(text, "lowrank")
    for name in ("experiments", "lowrank_search"):
        assert section(text, name) == section(first[0], name)
    assert section(readme.split("<!-- results:start -->")[1], "experiments") == \
        section(first[1].split("<!-- results:start -->")[1], "experiments")


def test_a_run_without_a_setting_leaves_its_section_out(tmp_path, capsys, no_figures):
    base = build_tree(tmp_path)
    cfg_path = edit(base / "runs" / "exp-smollm2" / "adamw-s0" / "finetune", lr=None)
    text, readme = regenerate(base)
    assert "<!-- section:experiments -->" not in text and "<!-- section:experiments -->" not in readme
    assert f"experiments: {cfg_path} records no lr" in text  # listed under "Not yet run", with the reason
    assert "section experiments left out" in capsys.readouterr().err
    assert "<!-- section:lowrank -->" in text  # the other sections are unaffected


@pytest.mark.parametrize("script", ["make_results.py", "exp_smollm2_s2d.py", "lowrank_grid.py"])
def test_bench_scripts_import_without_path_hacks(script, tmp_path):
    """The documented `python bench/<script>.py` entry points import their readers from s2d.experiments."""
    assert "sys.path" not in (BENCH / script).read_text()
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _speed_run(model: str, threads: int, fast_s: float) -> dict:
    return {"model": model, "threads": threads, "config": {"n_samples": 16, "seq_len": 256}, "linears": 210,
            "dense_fallbacks": 0, "exact": {"wall_s": 3 * fast_s, "spectra_s": 20.0},
            "fast": {"wall_s": fast_s, "spectra_s": 8.0}, "ratio": 3.0, "reading_identical": True,
            "max_rel_diff": {"sigma1": 1e-15, "linear input kurtosis": 1.8e-7}}


def test_diagnose_speed_rows_come_from_each_bench_file_with_its_target(tmp_path):
    out = tmp_path / "out" / "diagnose_speed"
    out.mkdir(parents=True)
    (out / "smollm2-135m-1t.json").write_text(json.dumps(_speed_run("smollm2-135m", 1, 49.1)))
    (out / "smollm2-135m-2t.json").write_text(json.dumps(_speed_run("smollm2-135m", 2, 29.1)))
    (out / "qwen2-0.5b-2t.json").write_text(json.dumps(_speed_run("qwen2-0.5b (random weights)", 2, 201.5)))
    r = results.Results(tmp_path / "runs", tmp_path / "figures", tmp_path / "out")
    results.diagnose_speed(r)
    text = "".join(r.parts)
    rows = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line for line in text.splitlines()
            if line.startswith("| ") and "random" in line or line.startswith("| smollm2")}
    assert "49.1" in rows["smollm2-135m/1"] and rows["smollm2-135m/1"].rstrip(" |").endswith("-")
    assert "29.1" in rows["smollm2-135m/2"] and rows["smollm2-135m/2"].rstrip(" |").endswith("met")
    assert rows["qwen2-0.5b (random weights)/2"].rstrip(" |").endswith("missed")  # 201.5 s > 3 min
    assert "python bench/diagnose_speed.py --shape qwen2-0.5b" in text
    assert "1.8e-07 (linear input kurtosis)" in text


def test_bias_speed_section_reads_the_bench_json(tmp_path):
    (tmp_path / "out").mkdir()
    task = {"items": 200, "items_in_task": 4229, "scoring": "shared prefix", "wall_s": 10.0, "cpu_s": 18.0,
            "plain_cpu_s": 45.0, "speedup_cpu": 2.5, "max_abs_ll_diff": 3e-5}
    (tmp_path / "out" / "bias_speed_compare.json").write_text(json.dumps(
        {"threads": 2, "limit": 200, "tasks": {"stereoset": task}, "total_wall_s": 611.0, "total_cpu_s": 1100.0,
         "target_s": 600, "basis": "extrapolated from --limit by items", "within_target": False}))
    r = results.Results(tmp_path / "runs", tmp_path / "figures", tmp_path / "out")
    results.bias_speed(r)
    text = "".join(r.parts)
    assert "--limit 200 --compare --out bench/out/bias_speed_compare.json" in text
    assert "2.50×" in text and "3.0e-05" in text and "611 s wall" in text and "over it" in text
