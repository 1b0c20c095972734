"""`s2d run RECIPE.yaml`: stages end to end, skipped on rerun, rerun from a changed stage, resumed after a kill,
sweeps split across workers, and every bad recipe refused before anything runs (tiny models only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from s2d.commands.recipe import parse_recipe
from s2d.commands.run import run_recipe
from s2d.errors import S2DError

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
GRID = """model: tiny:llama
seed: 0
stages:
  - stage: compress
    method: svd
    sweep: {keep: [0.9, 0.8]}
  - stage: quantize
    method: rtn
    n_samples: 2
    seq_len: 16
    ppl_tokens: 256
    sweep: {scheme: [W8A8, W4A8]}
"""


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _actions(result) -> dict[str, str]:
    return {e["folder"]: e["action"] for e in result["events"]}


def _stamps(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """recipes/tiny.yaml run once, uninterrupted."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = run_recipe(TINY, out)
    torch.set_num_threads(threads)
    return out, result


def test_a_four_stage_recipe_runs_end_to_end_and_a_rerun_skips_every_stage(reference):
    out, result = reference
    assert _actions(result) == {"00-finetune": "ran", "01-compress": "ran", "02-quantize": "ran", "03-eval": "ran"}
    for folder in ("00-finetune", "01-compress", "02-quantize"):
        assert (out / folder / "model" / "config.json").is_file()
        assert (out / folder / "metrics.json").is_file()
    # each stage read the model the one before it saved
    assert json.loads((out / "01-compress" / "metrics.json").read_text())["model"] == str(out / "00-finetune" / "model")
    assert json.loads((out / "03-eval" / "metrics.json").read_text())["model"] == str(out / "02-quantize" / "model")
    resolved = (out / "recipe.yaml").read_text()
    assert "TrainConfig" in resolved and "QuantRunConfig" in resolved and "s2d:" in resolved
    report = (out / "report.md").read_text()
    assert "| 02-quantize | quantize |" in report and "W8A8" in report and "figures/models.png" in report
    assert (out / "figures" / "models.png").is_file() and (out / "report.html").is_file()
    row, = result["table"]
    assert row["average_bits"] == {"w": 8.0, "a": 8.0} and row["params"] > 0 and row["size_bytes"] > 0
    assert any(k.startswith("ppl:wiki") for k in row["metrics"])

    before = _stamps(out)
    again = run_recipe(TINY, out)
    assert set(_actions(again).values()) == {"skipped"}
    assert _stamps(out) == before
    assert "skipped (finished" in (out / "run.log").read_text()


def test_a_changed_option_reruns_that_stage_and_the_ones_after_only(reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    before = _stamps(out)
    recipe = tmp_path / "changed.yaml"
    recipe.write_text(TINY.read_text().replace("method: gptq", "method: rtn"))
    result = run_recipe(recipe, out)
    assert _actions(result) == {"00-finetune": "skipped", "01-compress": "skipped", "02-quantize": "ran",
                                "03-eval": "ran"}
    after = _stamps(out)
    assert after["00-finetune"] == before["00-finetune"] and after["01-compress"] == before["01-compress"]
    assert after["02-quantize"] != before["02-quantize"] and after["03-eval"] != before["03-eval"]
    method = json.loads((out / "02-quantize" / "metrics.json").read_text())["results"]
    assert "W8A8 rtn" in method


def test_a_killed_stage_resumes_and_gives_the_same_final_model_bitwise(reference, tmp_path, monkeypatch):
    import s2d.commands.finetune as finetune_command

    real = finetune_command.make_task

    def dying_task(*args, **kwargs):
        task = real(*args, **kwargs)
        batch = task.batch

        def killed_at_step_3(step, *rest, **kw):
            if step == 3:
                raise RuntimeError("killed")
            return batch(step, *rest, **kw)
        task.batch = killed_at_step_3
        return task

    out = tmp_path / "killed"
    monkeypatch.setattr(finetune_command, "make_task", dying_task)
    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(TINY, out)
    state = json.loads((out / "state" / "00-finetune.json").read_text())
    assert state["status"] == "running" and (out / "00-finetune" / "checkpoints").is_dir()
    monkeypatch.setattr(finetune_command, "make_task", real)

    result = run_recipe(TINY, out)
    assert result["events"][0] == {"folder": "00-finetune", "action": "ran", "mode": "resume"}
    assert json.loads((out / "00-finetune" / "metrics.json").read_text())["resumed_from"] == 2
    ref = reference[0]
    for folder in ("00-finetune", "01-compress", "02-quantize"):
        for name in ("model.safetensors", "quantization.safetensors"):
            mine, theirs = out / folder / "model" / name, ref / folder / "model" / name
            assert mine.is_file() == theirs.is_file()
            if mine.is_file():
                assert mine.read_bytes() == theirs.read_bytes(), f"{folder}/model/{name} differs"


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_two_workers_over_a_grid_write_the_table_one_process_writes(tmp_path):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(GRID)
    one = run_recipe(recipe, tmp_path / "one")
    assert len(one["table"]) == 4
    assert sorted(_actions(one)) == ["00-compress-keep0.8", "00-compress-keep0.9",
                                     "01-quantize-keep0.8-schemeW4A8", "01-quantize-keep0.8-schemeW8A8",
                                     "01-quantize-keep0.9-schemeW4A8", "01-quantize-keep0.9-schemeW8A8"]

    first = run_recipe(recipe, tmp_path / "two", worker="0/2")
    assert first["table"] is None and len(first["pending"]) == 2  # the other worker's two quantize cells
    second = run_recipe(recipe, tmp_path / "two", worker="1/2")
    assert _actions(second)["00-compress-keep0.9"] == "skipped"  # the shared prefix, run by worker 0
    assert _without_seconds(second["table"]) == _without_seconds(one["table"])
    table = run_recipe(recipe, tmp_path / "two", table_only=True)
    assert _without_seconds(table["table"]) == _without_seconds(one["table"]) and table["events"] == []
    assert (tmp_path / "two" / "figures" / "cells.png").is_file()
    bits = {r["values"]["scheme (stage 1)"]: r["average_bits"]["w"] for r in one["table"]}
    assert bits == {"W8A8": 8.0, "W4A8": 4.0}


BAD = [
    ("model: tiny:llama\nstages:\n  - stage: eval\n  - stage: prune\n", r"line 4: stage 1: unknown stage 'prune'"),
    ("model: tiny:llama\nstages:\n  - stage: compress\n    keep: 0.8\n    kep: 0.9\n",
     r"line 5: stage 0 \(compress\): unknown option 'kep'; known: .*keep"),
    ("model: tiny:llama\nstages:\n  - stage: compress\n  - stage: quantize\n    method: smooth+gptq\n",
     r"line 4: stage 1 \(quantize\): method 'smooth\+gptq' applies SmoothQuant"),
    ("model: tiny:llama\nstages:\n  - stage: compress\n  - stage: quantize\n    scheme: W4A4\n    recipe: best\n",
     r"line 4: stage 1 \(quantize\): quantizes activations in groups of 32.*rank_multiple: 32"),
    ("model: tiny:llama\nstages:\n  - stage: quantize\n  - stage: finetune\n",
     r"line 4: stage 1 \(finetune\) cannot follow a quantize stage"),
    ("seed: 0\nstages:\n  - stage: eval\n", r"names no model"),
    ("model: ./no/such/folder\nstages:\n  - stage: eval\n", r"line 1: model './no/such/folder' is neither"),
    ("model: tiny:llama\nstages:\n  - stage: quantize\n    schemes: [W4A4, W4A8]\n",
     r"stage 0 \(quantize\): a recipe's quantize stage makes one model"),
    ("model: tiny:llama\nstages:\n  - stage: compress\n    keep: 7\n", r"line 3: stage 0 \(compress\): "),
    ("model: tiny:llama\nstagez: []\n", r"line 2: unknown recipe key 'stagez'"),
    ("model: tiny:llama\nstages:\n  - stage: compress\n    keep: [0.9, 0.8]\n", r"sweep: \{keep: \[...\]\}"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_each_bad_recipe_is_refused_naming_the_stage(text, message):
    with pytest.raises(S2DError, match=message):
        parse_recipe(text)


def test_an_export_stage_writes_the_gguf_and_must_come_last(tmp_path):
    recipe = ("model: tiny:llama\nstages:\n  - stage: compress\n    method: svd\n    keep: 0.9\n"
              "  - stage: export\n    type: Q8_0\n    check_tokens: 64\n")
    with pytest.raises(S2DError, match=r"stage 1 \(export\) cannot follow|cannot follow an export stage"):
        parse_recipe(recipe + "  - stage: eval\n")
    with pytest.raises(S2DError, match="unknown option 'bogus'"):
        parse_recipe(recipe + "    bogus: 1\n")
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    run_recipe(path, tmp_path / "out")
    export = next((tmp_path / "out").glob("01-export*"))
    assert (export / "model.gguf").stat().st_size > 0
    assert json.loads((export / "metrics.json").read_text())

VISION = """model: tiny:vit
seed: 0
stages:
  - stage: finetune
    task: image
    image_data: digits
    steps: 4
    batch_size: 16
    eval_every: 0
    checkpoint_every: 2
  - stage: compress
    method: rom
    keep: 0.9
    calib: digits
    n_samples: 16
    eval: [image:digits]
  - stage: quantize
    scheme: W8A8
    method: rtn
    overrides: {a_static: true, a_granularity: per_tensor}
    tasks: [image:digits]
    n_samples: 16
  - stage: eval
    tasks: [image:digits]
"""


def test_a_vision_recipe_finetunes_compresses_quantizes_static_and_evaluates_on_images(tmp_path):
    import torch

    from s2d import load_model
    from s2d.assets import load_model as load_dense
    from s2d.eval.images import evaluate_image_task
    from s2d.lowrank.budget import model_parameters
    from s2d.quant import quantized_layers

    path = tmp_path / "vit.yaml"
    path.write_text(VISION)
    out = tmp_path / "out"
    result = run_recipe(path, out)
    assert set(_actions(result).values()) == {"ran"} and len(_actions(result)) == 4
    metric = {stage: json.loads((out / stage / "metrics.json").read_text())
              for stage in ("01-compress", "02-quantize", "03-eval")}
    tuned = load_dense(str(out / "00-finetune" / "model"))[0]
    compressed = load_model(str(out / "01-compress" / "model"))[0]
    assert model_parameters(compressed) < model_parameters(tuned)
    plain = evaluate_image_task(compressed, "image:digits")["acc"]
    assert metric["01-compress"]["eval"]["image:digits"]["acc"] == plain
    quantized = load_model(str(out / "02-quantize" / "model"))[0]
    layers = quantized_layers(quantized)
    assert layers and all(m.act_scale is not None and m.act_scale.numel() == 1 for m in layers.values())
    cell = metric["02-quantize"]["results"]["W8A8 rtn"]
    assert cell["config"]["a_static"] and cell["config"]["a_granularity"] == "per_tensor"
    # the evaluated folder is the quantized one, reloaded to the accuracy the quantize stage measured in memory
    assert metric["03-eval"]["tasks"]["image:digits"]["acc"] == cell["eval"]["image:digits"]["acc"]
    with torch.no_grad():
        x = {"pixel_values": torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))}
        assert not torch.equal(quantized(**x).logits, compressed(**x).logits)  # the static scales act


def test_the_worked_recipes_parse():
    for path in sorted(TINY.parent.glob("*.yaml")):
        recipe = parse_recipe(path.read_text(), path)
        assert recipe.cells, path


def test_a_bad_recipe_writes_nothing(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: tiny:llama\nstages:\n  - stage: eval\n    nope: 1\n")
    with pytest.raises(S2DError, match="stage 0"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_runs_a_recipe_and_reports_a_bad_one(tmp_path, capsys):
    from s2d.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny:llama\nstages:\n  - stage: eval\n    tasks: [ppl:wiki]\n    ppl_tokens: 256\n"
                      "    seq_lens: [32]\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert "00-eval" in capsys.readouterr().out
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--worker", "2/2"]) == 2
    assert "--worker takes K/N" in capsys.readouterr().err


SHARED = """model: tiny:llama
seed: 0
stages:
  - stage: compress
    method: svd
    keep: 0.8
  - stage: quantize
    scheme: W8A8
    method: rtn
    n_samples: 2
    seq_len: 16
    ppl_tokens: 256
  - stage: export
    type: F16
    weights_only: true
    check_tokens: 0
evaluate:
  tasks: [ppl:wiki]
  seq_lens: [32]
  ppl_tokens: 256
"""


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """A recipe with `evaluate:`: one `s2d eval` of the input, the compressed, the quantized and the GGUF model."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("shared")
    recipe = root / "shared.yaml"
    recipe.write_text(SHARED)
    result = run_recipe(recipe, root / "out")
    torch.set_num_threads(threads)
    return root / "out", recipe, result


def test_the_shared_evaluation_scores_every_model_as_s2d_eval_would(shared_run, tmp_path):
    from s2d.commands.eval import run_eval
    from s2d.eval.suite import EvalConfig

    out, recipe, result = shared_run
    rows = ["input", "00-compress", "01-quantize", "02-export"]
    assert [e["folder"] for e in result["events"] if e["folder"].startswith("evaluate/")] == \
        [f"evaluate/{r}" for r in rows]
    scores = {}
    for row in rows:
        metrics = json.loads((out / "evaluate" / row / "metrics.json").read_text())
        scores[row] = metrics["tasks"]["ppl:wiki@32"]["ppl"]
    assert json.loads((out / "evaluate" / "02-export" / "metrics.json").read_text())["model"].endswith("model.gguf")
    # the same numbers `s2d eval` gives on its own, for the input and for the quantized folder
    config = EvalConfig(tasks=("ppl:wiki",), seq_lens=(32,), ppl_tokens=256, seed=0)
    alone = run_eval("tiny:llama", config, tmp_path / "alone")["tasks"]["ppl:wiki@32"]["ppl"]
    assert alone == scores["input"]
    alone = run_eval(str(out / "01-quantize" / "model"), config, tmp_path / "alone-q")["tasks"]["ppl:wiki@32"]["ppl"]
    assert alone == scores["01-quantize"]
    assert scores["00-compress"] != scores["input"]
    # the GGUF holds the quantized model's dequantized weights in F16, without the activation quantization
    assert scores["02-export"] == pytest.approx(scores["00-compress"], rel=0.05)
    report = (out / "report.md").read_text()
    assert "The same evaluation on every model" in report and "figures/shared.png" in report
    row, = result["table"]
    assert row["metrics"]["ppl:wiki@32 (evaluate)"] == scores["02-export"]
    kept = json.loads((out / "00-compress" / "metrics.json").read_text())["compression"]["summary"]["params_after"]
    assert f"| 00-compress | compress | {kept:,} |" in report and f"| 01-quantize | quantize | {kept:,} |" in report


def test_the_shared_evaluation_is_skipped_on_rerun_and_rerun_when_it_changes(shared_run, tmp_path):
    out, recipe, _ = shared_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = run_recipe(recipe, copy)
    assert set(_actions(again).values()) == {"skipped"}
    changed = tmp_path / "changed.yaml"
    changed.write_text(SHARED.replace("ppl_tokens: 256\n", "ppl_tokens: 192\n").replace(
        "    ppl_tokens: 192\n  - stage: export", "    ppl_tokens: 256\n  - stage: export"))
    result = _actions(run_recipe(changed, copy))
    assert result["00-compress"] == "skipped" and result["01-quantize"] == "skipped"
    assert {result[f"evaluate/{r}"] for r in ("input", "00-compress", "01-quantize", "02-export")} == {"ran"}


def test_a_bad_evaluate_section_is_refused():
    with pytest.raises(S2DError, match=r"line \d+: evaluate: .*bogus"):
        parse_recipe(SHARED + "  bogus: 1\n")
    with pytest.raises(S2DError, match="needs tasks"):
        parse_recipe("model: tiny:llama\nstages:\n  - stage: eval\nevaluate: {limit: 3}\n")


def test_the_run_report_opens_in_a_real_browser(shared_run):
    from browser import probe

    out, _, _ = shared_run
    seen = probe(out / "report.html")
    assert len(seen["images"]) == 2 and all(width > 0 for width in seen["images"]), seen
    assert {"shared", "models", "stages"} <= set(seen["tables"]), seen
