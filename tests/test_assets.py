import gzip
import json
import struct

import numpy as np
import pytest
import torch

from s2d.assets import (
    calibration_batch,
    load_analogies,
    load_digits,
    load_fashion_mnist,
    load_model,
    load_polarity,
    load_wiki,
)
from s2d.assets.data import _gensim_data, _read_idx
from s2d.assets.tiny import TINY_FAMILIES, byte_tokenizer, tiny_model
from s2d.errors import S2DError


def test_unknown_model_name():
    with pytest.raises(S2DError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")


def test_unknown_tiny_family():
    with pytest.raises(S2DError, match="unknown tiny family"):
        load_model("tiny:gpt9")


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("nothing")
    with pytest.raises(S2DError, match="no config.json"):
        load_model(tmp_path)


def test_folder_with_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-real-family", "architectures": ["X"]}))
    with pytest.raises(S2DError, match="cannot read the config"):
        load_model(tmp_path)


def test_local_folder_roundtrip(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(tmp_path)
    ids = torch.tensor([tok("a local folder")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert tok2.decode(ids[0]) == "a local folder"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_models_are_seeded(family):
    a, _ = tiny_model(family)
    b, _ = tiny_model(family)
    c, _ = tiny_model(family, seed=1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)
    assert sum(p.numel() for p in a.parameters()) < 300_000


def test_byte_tokenizer_roundtrip():
    tok = byte_tokenizer()
    text = "Grüße, 東京! <not special>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_wiki_split_deterministic_and_disjoint():
    splits = {s: load_wiki(s) for s in ("train", "validation", "test")}
    titles = {s: {a.title for a in arts} for s, arts in splits.items()}
    assert not (titles["train"] & titles["validation"] or titles["train"] & titles["test"]
                or titles["validation"] & titles["test"])
    total = sum(len(t) for t in titles.values())
    assert total >= 100
    assert 0.75 <= len(titles["train"]) / total <= 0.85
    assert [a.title for a in load_wiki("test")] == [a.title for a in splits["test"]]
    assert all(len(a.text) >= 500 and "[[" not in a.text for arts in splits.values() for a in arts)


def test_wiki_unknown_split():
    with pytest.raises(S2DError, match="unknown wiki split"):
        load_wiki("dev")


def test_polarity_and_analogies():
    rows = load_polarity()
    assert len(rows) == 200 and sum(label for _, label in rows) == 100
    analogies = load_analogies()
    assert len(analogies) == 19544
    assert len({r[0] for r in analogies}) == 14
    assert analogies[0] == ("capital-common-countries", "Athens", "Greece", "Baghdad", "Iraq")


def test_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert set(labels.tolist()) == set(range(10))


def _write_idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28))
    labels = rng.integers(0, 10, size=(5,))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = load_fashion_mnist("test", folder=tmp_path)
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images.astype(np.uint8)))
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_truncated_idx(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + b"\x00" * 4)
    with pytest.raises(S2DError, match="truncated"):
        _read_idx(path)


def test_missing_dataset_names_install_command(tmp_path):
    with pytest.raises(S2DError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", folder=tmp_path)
    with pytest.raises(S2DError, match="pip install"):
        _gensim_data("no-such-file.txt")


def test_calibration_batch():
    tok = byte_tokenizer()
    text = "abcdefghijklmnopqrstuvwxyz" * 20
    batch = calibration_batch(tok, text, n_samples=8, seq_len=16, seed=3)
    assert batch.shape == (8, 16) and batch.dtype == torch.long
    assert torch.equal(batch, calibration_batch(tok, [text], n_samples=8, seq_len=16, seed=3))
    assert not torch.equal(batch, calibration_batch(tok, text, n_samples=8, seq_len=16, seed=4))
    stream = tok(text, add_special_tokens=False)["input_ids"]
    for row in batch.tolist():  # every row is a contiguous window of the text
        assert any(stream[s : s + 16] == row for s in range(len(stream) - 15))


@pytest.mark.parametrize(("text", "n", "length", "match"), [
    ("", 4, 8, "empty"), ("   \n", 4, 8, "empty"), ("some text", 0, 8, "positive"), ("short", 2, 64, "fewer than"),
])
def test_calibration_batch_bad_input(text, n, length, match):
    with pytest.raises(S2DError, match=match):
        calibration_batch(byte_tokenizer(), text, n_samples=n, seq_len=length)


def test_scratch_vit_for_pretraining():
    from s2d.arch import describe

    model, processor = load_model("scratch:vit-fmnist")
    assert processor is None and len(describe(model).blocks) == 6
    logits = model(pixel_values=torch.zeros(2, 1, 28, 28)).logits
    assert logits.shape == (2, 10)
    with pytest.raises(S2DError, match="unknown scratch model"):
        load_model("scratch:resnet")
