import json

from s2d.cli import main


def test_info_json(capsys):
    assert main(["info", "tiny:llama", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llama" and info["blocks"] == 3 and info["linears"] == 21


def test_info_text(capsys):
    assert main(["info", "tiny:vit"]) == 0
    out = capsys.readouterr().out
    assert "family vit" in out and "fc1" in out and "64x128" in out


def test_bad_model_is_a_clear_error(capsys):
    assert main(["info", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2d: error: unknown model 'nope'") and "Traceback" not in err
