"""Vision models in `s2d eval` and `s2d quantize`: top-1 accuracy on a test split against a plain per-image loop,
calibration on train images only, the default tasks of a vision model, and the saved quantized ViT."""

import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s2d.assets import calibration_images, load_model
from s2d.errors import S2DError
from s2d.eval.images import evaluate_image_task
from s2d.eval.suite import EvalConfig, evaluate


@pytest.fixture(scope="module")
def vit():
    return load_model("tiny:vit")[0]


def _write_idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion(tmp_path):
    """A Fashion-MNIST folder of 12 train and 9 test images (random pixels), and the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 9)):
        images, labels = rng.integers(0, 256, size=(n, 28, 28)), rng.integers(0, 10, size=(n,))
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (images, labels)
    return tmp_path, arrays


def _plain_pixels(model, images: np.ndarray) -> torch.Tensor:
    """One image, grey in [0, 255], as the ViT sees it: resized bilinearly, centred to [-1, 1]."""
    x = torch.tensor(images, dtype=torch.float32)[None, None] / 255
    size = model.config.image_size
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, model.config.num_channels, -1, -1)


def test_accuracy_is_the_plain_per_image_count(vit, fashion):
    folder, arrays = fashion
    images, labels = arrays["t10k"]
    hits = 0
    with torch.no_grad():
        for image, label in zip(images, labels, strict=True):
            hits += int(vit(pixel_values=_plain_pixels(vit, image)).logits.argmax(-1).item() == label)
    got = evaluate_image_task(vit, "image:fashion-mnist", folder=folder)
    assert got["n"] == 9 and got["acc"] == hits / 9 and got["chance"] == pytest.approx(0.1)
    assert evaluate_image_task(vit, "image:fashion-mnist", limit=4, folder=folder)["n"] == 4


def test_calibration_takes_train_images_only(vit, fashion):
    folder, arrays = fashion
    calib = calibration_images(vit, "fashion-mnist", 5, folder=folder, seed=3)["pixel_values"]
    train = torch.cat([_plain_pixels(vit, im) for im in arrays["train"][0]])
    test = torch.cat([_plain_pixels(vit, im) for im in arrays["t10k"][0]])
    assert calib.shape[0] == 5
    for row in calib:  # each calibration image is one of the train images, none of the test images
        assert any(torch.allclose(row, t, atol=1e-6) for t in train)
        assert not any(torch.allclose(row, t, atol=1e-6) for t in test)


def test_a_vision_model_gets_image_tasks_and_a_text_model_text_ones(vit, fashion, tmp_path):
    from s2d.commands.eval import run_eval

    folder, _ = fashion
    m = run_eval("tiny:vit", EvalConfig(image_folder=str(folder)), tmp_path / "eval")  # the text defaults left
    assert list(m["tasks"]) == ["image:fashion-mnist"] and m["tasks"]["image:fashion-mnist"]["n"] == 9
    assert "Image classification" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(S2DError, match="cannot score this vision model"):
        evaluate(vit, None, EvalConfig(tasks=("ppl:wiki",)))
    llama, tok = load_model("tiny:llama")
    with pytest.raises(S2DError, match="cannot score this text model"):
        evaluate(llama, tok, EvalConfig(tasks=("image:digits",)))


def test_quantize_a_vit_from_the_command_layer_and_reload_it(tmp_path):
    import s2d
    from s2d.commands.quantize import QuantRunConfig, run_quantize

    config = QuantRunConfig(schemes=("W8A8",), tasks=("image:digits",), limit=60, n_samples=8,
                            overrides={"a_static": True, "a_granularity": "per_tensor", "softmax_bits": 8,
                                       "patch_embed_bits": 8, "layer_schemes": {"head": "W8A8"}}).validate()
    m = run_quantize("tiny:vit", config, tmp_path / "q", progress=False)
    cell = m["results"]["W8A8 rtn"]
    assert cell["config"]["softmax_bits"] == 8 and cell["eval"]["image:digits"]["n"] == 60
    assert cell["sqnr"]["classifier"]["role"] == "head"  # the head was quantized too, and is named as such
    reloaded, _ = s2d.load_model(str(tmp_path / "q" / "model"))
    again = evaluate_image_task(reloaded, "image:digits", limit=60)
    assert again["acc"] == cell["eval"]["image:digits"]["acc"]


def test_low_rank_calibration_of_a_vit_is_its_train_images():
    import copy

    from s2d.lowrank import LowRankConfig, compress

    model = load_model("tiny:vit")[0]
    config = LowRankConfig(method="rom", keep=0.8, calib="digits", n_samples=16)
    by_name, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    compress(by_name, config, progress=False)
    compress(by_hand, config, calib=calibration_images(model, "digits", 16, seed=config.seed), progress=False)
    a, b = by_name.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = copy.deepcopy(model)  # rom's factors depend on the images: other images give other factors
    compress(other, config, calib=calibration_images(model, "digits", 16, seed=1), progress=False)
    c = other.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a) and len(a) > len(model.state_dict())  # factorized
    with pytest.raises(S2DError, match="--calib fashion-mnist or digits"):
        compress(copy.deepcopy(model), LowRankConfig(method="rom", keep=0.8, n_samples=4), progress=False)
    llama, tok = load_model("tiny:llama")
    with pytest.raises(S2DError, match="use --calib wiki"):
        compress(llama, config, tokenizer=tok, progress=False)
