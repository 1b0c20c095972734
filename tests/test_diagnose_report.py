"""The diagnose and compare commands end to end: run folder, figures, report, and a real browser."""

import json

import pytest
from browser import probe

from s2d.cli import main

FIGURES = {"max_per_block.png", "channel_heatmap.png", "spectra.png", "link_scatter.png", "pcdr.png"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "run"
    assert main(["diagnose", "tiny:llama", "--n-samples", "4", "--seq-len", "32", "--out", str(out)]) == 0
    return out


def test_diagnose_writes_the_run_folder(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.yaml", "metrics.json", "report.md", "report.html", "figures"} <= names
    assert {p.name for p in (tiny_run / "figures").iterdir()} == FIGURES
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["samples"] == 4 and metrics["seq_len"] == 32 and len(metrics["linears"]) == 21
    md = (tiny_run / "report.md").read_text()
    assert all(f"figures/{f}" in md for f in FIGURES)
    assert "s2d diagnose" in md


def test_report_opens_in_a_real_browser(tiny_run):
    seen = probe(tiny_run / "report.html")
    assert len(seen["images"]) == len(FIGURES)
    assert all(width > 0 for width in seen["images"]), seen
    assert "headline" in seen["tables"] and "link" in seen["tables"]


def test_compare_ranks_the_planted_model_first(tmp_path, capsys):
    import torch

    from s2d.arch import describe
    from s2d.assets import load_model

    model, tok = load_model("tiny:llama")
    with torch.no_grad():
        describe(model).blocks[1].linears[0].module.weight.mul_(50.0)
    folder = tmp_path / "loud"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "cmp"
    assert main(["compare", "tiny:llama", str(folder), "--n-samples", "2", "--seq-len", "16", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranking"] == [str(folder), "tiny:llama"]
    assert (out / "figures" / "compare.png").stat().st_size > 0
    assert probe(out / "report.html")["images"][0] > 0


@pytest.mark.parametrize("argv,match", [
    (["diagnose", "tiny:llama", "--n-samples", "0"], "n-samples must be at least 1"),
    (["diagnose", "no-such-model"], "no-such-model"),
])
def test_bad_input_is_a_clear_error(argv, match, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert match in capsys.readouterr().err


def test_unwritable_output_folder_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["diagnose", "tiny:llama", "--out", str(blocker / "run")]) == 2
    assert "s2d: error:" in capsys.readouterr().err
