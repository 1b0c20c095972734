"""`s2d quantize`: a saved, reloadable single run with SQNR, and a sweep table, on tiny models."""

import json

import pytest

from s2d.cli import main

SMALL = ["--n-samples", "4", "--seq-len", "32", "--ppl-tokens", "1024"]


def test_single_scheme_is_saved_evaluated_and_reloads(tmp_path, capsys):
    from s2d import load_model
    from s2d.eval.suite import EvalConfig, evaluate

    out = tmp_path / "q"
    assert main(["quantize", "tiny:llama", "--scheme", "W4A8", "--method", "gptq", *SMALL, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["results"]["W4A8 gptq"]
    assert len(entry["sqnr"]) == 21 and all("accumulated_db" in v for v in entry["sqnr"].values())
    assert (out / "figures" / "sqnr_W4A8_gptq.png").stat().st_size > 0
    model, tok = load_model(out / "model")
    config = EvalConfig.from_dict(metrics["eval_config"])
    again = evaluate(model, tok, config, progress=False)["ppl:wiki@128"]["ppl"]
    assert again == entry["eval"]["ppl:wiki@128"]["ppl"]
    assert "W4A8 gptq" in capsys.readouterr().out


def test_sweep_fills_every_cell(tmp_path):
    out = tmp_path / "sweep"
    argv = ["quantize", "tiny:qwen2", "--sweep", "--schemes", "W8A8,W4A4", "--methods", "rtn,rotate+gptq", *SMALL,
            "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert set(results) == {"FP", "W8A8 rtn", "W8A8 rotate+gptq", "W4A4 rtn", "W4A4 rotate+gptq"}
    fp = results["FP"]["eval"]["ppl:wiki@128"]["ppl"]
    w8 = results["W8A8 rtn"]["eval"]["ppl:wiki@128"]["ppl"]
    assert abs(w8 / fp - 1) < 0.05  # 8 bits is nearly lossless on a tiny model
    assert (out / "figures" / "grid.png").stat().st_size > 0
    assert "| W4A4 |" in (out / "report.md").read_text()
    assert not (out / "model").exists()


@pytest.mark.parametrize("argv,match", [
    (["--scheme", "W1A4"], "bits"),
    (["--sweep", "--methods", "rtn,magic"], "unknown method"),
])
def test_bad_quantize_input_is_a_clear_error(argv, match, tmp_path, capsys):
    assert main(["quantize", "tiny:llama", *argv, "--out", str(tmp_path / "x")]) == 2
    assert match in capsys.readouterr().err


def test_rotation_on_a_post_norm_family_says_why(tmp_path, capsys):
    assert main(["quantize", "tiny:bert", "--rotate", *SMALL, "--out", str(tmp_path / "x")]) == 2
    assert "LayerNorm" in capsys.readouterr().err


def test_an_interrupted_sweep_resumes_cell_by_cell(tmp_path):
    out = tmp_path / "sweep"
    first = ["quantize", "tiny:llama", "--sweep", "--schemes", "W8A8", "--methods", "rtn", *SMALL, "--out", str(out)]
    assert main(first) == 0
    done = json.loads((out / "metrics.json").read_text())["results"]
    done["W8A8 rtn"]["eval"]["ppl:wiki@128"]["ppl"] = -1.0  # a marker: a resumed cell is read, not recomputed
    (out / "metrics.json").write_text(json.dumps({**json.loads((out / "metrics.json").read_text()),
                                                  "results": done}))
    assert main([*first[:4], "W8A8,W4A4", *first[5:]]) == 2  # a non-empty run folder needs --resume
    assert main([*first[:4], "W8A8,W4A4", *first[5:], "--resume"]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert results["W8A8 rtn"]["eval"]["ppl:wiki@128"]["ppl"] == -1.0
    assert results["W4A4 rtn"]["eval"]["ppl:wiki@128"]["ppl"] > 1.0
