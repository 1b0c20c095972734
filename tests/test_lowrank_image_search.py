"""The image variant of the surgical rank search: its split (train images calibration does not use), per-chunk
accuracy against a plain per-image loop, the walk on a ViT, the CLI, and its errors."""

import json

import pytest
import torch

from s2d import load_model
from s2d.assets import calibration_images, image_split, model_pixels
from s2d.cli import main
from s2d.commands.search_probe import image_probe
from s2d.errors import S2DError
from s2d.lowrank import LowRankConfig, compress
from s2d.lowrank.budget import model_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw):
    base = dict(method="rom", keep=None, search="image", calib="digits", n_samples=16, search_images=90,
                search_chunks=3, acc_tolerance=0.05, chunk_size=8)
    return LowRankConfig(**{**base, **kw})


def test_split_follows_the_calibration_images_in_their_seeded_order():
    model, _ = load_model("tiny:vit")
    config = _config()
    probe = image_probe(model, config, batch_size=32)
    images, _ = image_split("digits", "train", seed=0)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    calib = calibration_images(model, "digits", config.n_samples, seed=0)["pixel_values"]
    assert torch.equal(calib, model_pixels(model, images[order[:16]]))  # calibration takes the first 16 ...
    search = torch.cat([b["pixel_values"] for b in probe.batches])
    assert torch.equal(search, model_pixels(model, images[order[16:106]]))  # ... the search the next 90
    assert probe.reference()["search_images"] == 90


def test_probe_accuracy_from_cached_blocks_matches_a_plain_per_image_loop():
    model, _ = load_model("tiny:vit")
    config = _config()
    probe = image_probe(model, config, batch_size=32)
    images, labels = image_split("digits", "train", seed=0)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[16:106]
    with torch.no_grad():
        right = [int(model(pixel_values=model_pixels(model, images[i: i + 1])).logits.argmax()) == int(labels[i])
                 for i in order]
    for c in range(3):
        plain = sum(right[c::3]) / len(right[c::3])
        assert probe.acc_ref[c] == pytest.approx(plain, abs=1e-12)
    for block in (1, 2):  # skipping the dense blocks before `block` changes nothing
        assert probe._accuracy(block) == probe.acc_ref


def test_image_search_walks_a_vit_from_the_last_block_and_keeps_each_chunk_within_tolerance():
    model, _ = load_model("tiny:vit")
    config = _config()
    dense = model_parameters(model)
    report = compress(model, config, probe=image_probe(model, config), progress=False)
    s = report.search
    assert s["variant"] == "image" and len(s["acc_ref"]) == 3
    layers = list(dict.fromkeys(t["layer"] for t in s["trials"]))
    assert ".layers.2." in layers[0] and ".layers.0." in layers[-1]
    assert report.ranks, "a 0.05 tolerance on a random tiny ViT should accept some ranks"
    assert model_parameters(model) < dense == report.summary["params_before"]
    for name in layers:  # SFSD's rule: the first rank at which every chunk has passed at least once
        tried = [t for t in s["trials"] if t["layer"] == name]
        done = [all(any(t["passed"][c] for t in tried[: i + 1]) for c in range(3)) for i in range(len(tried))]
        if name in report.ranks:
            assert done[-1] and not any(done[:-1]) and tried[-1]["rank"] == report.ranks[name]
        else:
            assert not any(done)
    for t in s["trials"]:
        assert t["passed"] == [a >= r - 0.05 for a, r in zip(t["acc"], s["acc_ref"], strict=True)]
    assert image_probe(model, config)._accuracy(0) == s["acc_final"]  # the record is the compressed model's


def test_image_search_errors_say_what_to_do():
    vit, _ = load_model("tiny:vit")
    llama, tok = load_model("tiny:llama")
    with pytest.raises(S2DError, match="needs a vision model"):
        image_probe(llama, _config(calib="wiki"))
    with pytest.raises(S2DError, match="lower --search-images"):
        image_probe(vit, _config(search_images=5000))
    with pytest.raises(S2DError, match="use --search image"):
        compress(vit, _config(search="ppl"), progress=False)
    with pytest.raises(S2DError, match="needs its probe"):
        compress(vit, _config(), progress=False)
    with pytest.raises(S2DError, match="search_images"):
        _config(search_images=2).validate()


def test_cli_image_search_writes_its_record_and_scores_the_test_split(tmp_path):
    out = tmp_path / "run"
    assert main(["compress", "tiny:vit", "--search", "image", "--calib", "digits", "--n-samples", "16",
                 "--search-images", "60", "--acc-tolerance", "0.1", "--eval", "image:digits", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["compression"]["search"]["variant"] == "image" and m["compression"]["search"]["search_images"] == 60
    assert m["eval"]["image:digits"]["source"].startswith("digits test split")
    assert (out / "search_trials.json").is_file()
    assert "search digits train images acc per chunk" in (out / "report.md").read_text()
