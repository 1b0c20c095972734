"""Real packaged models: SmolLM2 (from its GGUF package, via the s2d cache) and MiniLM."""

import json
import logging
import shutil
import time

import pytest
import torch

from s2d.arch import describe, summary
from s2d.assets import load_model
from s2d.assets.models import MANIFEST, _cache_is_complete, smollm2_cache_dir

pytestmark = pytest.mark.real


def test_smollm2_structure_and_forward(smollm2):
    model, tok = smollm2
    info = summary(model)
    assert info["blocks"] == 30 and info["linears"] == 210
    assert info["parameters"] == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_smollm2_reloads_from_cache(smollm2, report_figure):
    assert _cache_is_complete(smollm2_cache_dir())
    t0 = time.perf_counter()
    model, _ = load_model("smollm2-135m")
    elapsed = time.perf_counter() - t0
    report_figure(f"SmolLM2 reload from the safetensors cache: {elapsed:.2f} s")
    reference = dict(smollm2[0].named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, reference[name]), name


def test_truncated_cache_is_rebuilt(smollm2, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(smollm2_cache_dir(), cache / "models" / smollm2_cache_dir().name)
    monkeypatch.setenv("S2D_CACHE", str(cache))
    weights = smollm2_cache_dir() / "model.safetensors"
    assert weights.is_relative_to(cache)
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    assert not _cache_is_complete(smollm2_cache_dir())
    with caplog.at_level(logging.WARNING, logger="s2d"):
        model, _ = load_model("smollm2-135m")
    assert "rebuilding" in caplog.text
    assert _cache_is_complete(smollm2_cache_dir())
    torch.testing.assert_close(model.lm_head.weight, smollm2[0].lm_head.weight, rtol=0, atol=0)


def test_cache_manifest_checks(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"1234")
    assert not _cache_is_complete(tmp_path)  # no manifest: a crash before the rename would look like this
    (tmp_path / MANIFEST).write_text(json.dumps({"sizes": {"a.bin": 4}}))
    assert _cache_is_complete(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"sizes": {"a.bin": 5}}))
    assert not _cache_is_complete(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    assert not _cache_is_complete(tmp_path)


def test_minilm_loads(minilm):
    model, tok = minilm
    desc = describe(model)
    assert desc.family.name == "bert" and len(desc.blocks) == 6 and len(desc.linears()) == 36
    batch = tok(["a sentence to embed"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
