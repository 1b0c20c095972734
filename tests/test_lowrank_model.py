"""Low-rank compression of whole models: the block runner, budgets, save/reload, disk mode, search, errors."""

import json
import math

import pytest
import torch
import transformers

from s2d import load_model
from s2d.arch import describe
from s2d.errors import S2DError
from s2d.lowrank import FactorizedLinear, LowRankConfig, compress, compress_folder, save
from s2d.lowrank.budget import model_parameters
from s2d.lowrank.rom import OutputStats, rom_factors
from s2d.lowrank.runner import BlockRunner, forward_from, returns_tuple

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=8, seq=32, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _describes(folder) -> dict:
    """What compress_folder needs to know of a folder's model (the command layer reads it in `s2d compress`)."""
    from s2d.assets.hf import model_class, pretrained_config

    config = pretrained_config(folder, trust_remote_code=False)
    return {"hf_config": config, "model_class": model_class(config)}


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits


@pytest.mark.parametrize("family,groups", [
    ("llama", [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]),
    ("bert", [["q", "k", "v"], ["o"], ["fc1"], ["fc2"]]),
])
def test_runner_groups_linears_by_shared_input_in_execution_order(family, groups):
    model, _ = load_model(f"tiny:{family}")
    desc = describe(model)
    runner = BlockRunner(desc, _calib(4, 16), chunk_size=2)
    role = {lin.name: lin.role for lin in desc.blocks[1].linears}
    names = list(reversed(role))  # the order asked in does not matter
    assert [[role[n] for n in g] for g in runner.groups(1, names)] == groups


@pytest.mark.parametrize("method", ["svd", "asvd", "rom"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "bert"])
def test_compress_hits_the_budget_and_keeps_the_model_working(family, method):
    model, _ = load_model(f"tiny:{family}")
    total = model_parameters(model)
    ids = _calib()
    report = compress(model, LowRankConfig(method=method, keep=0.8, chunk_size=3), calib=ids, progress=False)
    after = model_parameters(model)
    assert after == report.summary["params_after"]  # what the budget requested, exactly
    assert after == pytest.approx(0.8 * total, rel=0.005)
    assert report.ranks and all(isinstance(model.get_submodule(n), FactorizedLinear) for n in report.ranks)
    assert torch.isfinite(_logits(model, ids)).all()


def test_sequential_rom_calibrates_each_layer_on_the_compressed_upstream():
    """The last Linear's factors equal rom on statistics gathered by a plain forward of the final model."""
    model, _ = load_model("tiny:llama")
    dense = {n: (m.weight.detach().clone(), None) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = _calib(8, 32)
    report = compress(model, LowRankConfig(method="rom", keep=0.7, chunk_size=3), calib=ids, progress=False)
    name = "model.layers.2.mlp.down_proj"
    assert name in report.ranks and "model.layers.2.mlp.up_proj" in report.ranks
    stats = OutputStats(model.get_submodule(name).out_features)
    weight = dense[name][0]
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: stats.update(a[0] @ weight.T))
    _logits(model, ids)  # everything upstream of down_proj is in its final, compressed state
    handle.remove()
    ref = rom_factors(weight, None, stats).linear(report.ranks[name], dtype=torch.float64)
    got = model.get_submodule(name)
    torch.testing.assert_close(got.B.weight.double() @ got.A.weight.double(), ref.B.weight @ ref.A.weight,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.B.bias.double(), ref.B.bias, atol=1e-5, rtol=1e-4)


def test_full_rank_model_reproduces_the_dense_model():
    model, _ = load_model("tiny:llama")
    ids = _calib(16, 32)
    ref = _logits(model, ids)
    desc = describe(model)
    full = {lin.role: min(lin.shape) for lin in desc.linears()}
    for method in ("svd", "asvd", "rom"):
        model, _ = load_model("tiny:llama")
        # Full rank saves nothing, so the budget keeps such layers dense; build them directly instead.
        from s2d.lowrank.api import decompose_blocks

        decompose_blocks(describe(model), {lin.name: full[lin.role] for lin in desc.linears()},
                         LowRankConfig(method=method, damp=1e-10), ids, progress=False)
        assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == len(desc.linears())
        torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_reload_forward_identical_and_merge_loads_in_plain_transformers(family, tmp_path):
    model, tok = load_model(f"tiny:{family}")
    ids = _calib()
    compress(model, LowRankConfig(method="rom", keep=0.8, chunk_size=4), calib=ids, progress=False)
    out = _logits(model, ids)
    save(model, tmp_path / "lr", tok, method="rom")
    block = json.loads((tmp_path / "lr" / "config.json").read_text())["low_rank"]
    assert set(block["layers"]) == {n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    again, _ = load_model(tmp_path / "lr")
    assert torch.equal(_logits(again, ids), out)
    if family == "llama":  # rom's new biases fit Llama's attention_bias/mlp_bias switches
        save(model, tmp_path / "merged", tok, merge=True)
        plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(_logits(plain.eval(), ids), out, atol=1e-4, rtol=1e-4)
    else:  # Qwen2 has no switch for o/MLP biases: refuse rather than drop them
        with pytest.raises(S2DError, match="cannot hold the biases"):
            save(model, tmp_path / "merged", tok, merge=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied head; untied head (left on meta until the end)
def test_compress_from_disk_block_by_block_equals_in_memory(tmp_path, family):
    model, tok = load_model(f"tiny:{family}")
    model.save_pretrained(tmp_path / "dense", max_shard_size="60KB")  # several shards
    tok.save_pretrained(tmp_path / "dense")
    assert len(list((tmp_path / "dense").glob("*.safetensors"))) > 2
    ids = _calib()
    config = LowRankConfig(method="rom", keep=0.75, chunk_size=3)
    mem = compress(model, config, calib=ids, progress=False)
    disk = compress_folder(tmp_path / "dense", config, tmp_path / "out", calib=ids, progress=False,
                           **_describes(tmp_path / "dense"))
    assert disk.ranks == mem.ranks and disk.summary == mem.summary
    again, _ = load_model(tmp_path / "out")
    assert torch.equal(_logits(again, ids), _logits(model, ids))


def _vit_logits(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).logits


@pytest.mark.parametrize("method", ["svd", "rom"])
def test_vit_checkpoint_in_legacy_names_compresses_from_disk_like_in_memory(tmp_path, method):
    """ViT checkpoints hold the names transformers used before it renamed the modules (encoder.layer.N.attention
    .attention.query); the disk path renames them as from_pretrained does and writes them back as
    save_pretrained does."""
    model, _ = load_model("tiny:vit")
    model.save_pretrained(tmp_path / "dense")
    from safetensors import safe_open

    with safe_open(tmp_path / "dense" / "model.safetensors", "pt") as fh:
        assert "vit.encoder.layer.0.attention.attention.query.weight" in set(fh.keys())  # the legacy layout
    size = model.config.image_size
    pixels = torch.randn(6, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    calib = {"pixel_values": pixels} if method == "rom" else None
    config = LowRankConfig(method=method, keep=0.75, chunk_size=4)
    mem = compress(model, config, calib=calib, progress=False)
    disk = compress_folder(tmp_path / "dense", config, tmp_path / "out", calib=calib, progress=False,
                           **_describes(tmp_path / "dense"))
    assert disk.ranks == mem.ranks and disk.summary == mem.summary
    again, _ = load_model(tmp_path / "out")
    assert torch.allclose(_vit_logits(again, pixels), _vit_logits(model, pixels), atol=1e-5)
    save(model, tmp_path / "mem", method=method)  # the in-memory save writes the same names, and reloads too
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(tmp_path / "mem" / "model.safetensors", "pt") as fh:
        assert set(written) == set(fh.keys())
    again, _ = load_model(tmp_path / "mem")
    assert torch.allclose(_vit_logits(again, pixels), _vit_logits(model, pixels), atol=1e-5)


def test_checkpoint_names_are_renamed_by_transformers_rules_and_conversions_refused():
    from s2d.lowrank.io import skeleton
    from s2d.lowrank.names import model_names

    vit, _ = load_model("tiny:vit")
    vit = skeleton(vit.config, type(vit))
    legacy = ["vit.encoder.layer.1.attention.attention.query.weight", "vit.encoder.layer.1.attention.output.dense.bias",
              "vit.encoder.layer.1.intermediate.dense.weight", "vit.encoder.layer.1.output.dense.weight",
              "vit.embeddings.cls_token", "classifier.weight"]
    assert model_names(vit, legacy) == {
        "vit.layers.1.attention.q_proj.weight": legacy[0], "vit.layers.1.attention.o_proj.bias": legacy[1],
        "vit.layers.1.mlp.fc1.weight": legacy[2], "vit.layers.1.mlp.fc2.weight": legacy[3],
        "vit.embeddings.cls_token": legacy[4], "classifier.weight": legacy[5]}
    assert model_names(vit, ["vit.layers.1.mlp.fc2.weight"]) == {"vit.layers.1.mlp.fc2.weight":
                                                                 "vit.layers.1.mlp.fc2.weight"}  # already current
    llama, _ = load_model("tiny:llama")
    keys = list(llama.state_dict())
    assert model_names(llama, keys) == {k: k for k in keys}  # families without renamings pass through
    dinov2 = skeleton(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, use_swiglu_ffn=True, image_size=32,
                                                patch_size=8), transformers.Dinov2Model)
    with pytest.raises(S2DError, match=r"encoder\.layer\.0\.mlp\.weights_in\.weight.*compress it in memory"):
        model_names(dinov2, ["encoder.layer.0.mlp.weights_in.weight"])  # one tensor split in two: a converter


def test_a_transformers_without_the_renaming_internals_gets_a_clear_error(monkeypatch):
    import transformers.core_model_loading as core

    from s2d.lowrank.names import checkpoint_state, model_names

    llama, _ = load_model("tiny:llama")
    monkeypatch.delattr(core, "rename_source_key")  # as a release that moved it would have it
    with pytest.raises(S2DError, match=r"has no core_model_loading\.rename_source_key.*compress it in memory"):
        model_names(llama, list(llama.state_dict()))
    monkeypatch.delattr(core, "revert_weight_conversion")
    with pytest.raises(S2DError, match=r"revert_weight_conversion.*pip install"):
        checkpoint_state(llama, llama.state_dict())


def test_compress_from_disk_frees_each_block_it_has_written(tmp_path, monkeypatch):
    """Peak memory follows one block: once block i is written, no block Linear holds real weights (the
    replaced dense Linears included, which the model description still references)."""
    from s2d.lowrank.runner import DiskBlocks

    model, tok = load_model("tiny:qwen2")
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    live_after = []
    release = DiskBlocks.release

    def counting_release(self, i):
        release(self, i)
        head = self.desc.model.get_submodule(self.desc.head)
        ours = {id(m): m for m in [*self.desc.model.modules(), *(lin.module for lin in self.desc.linears())]
                if isinstance(m, torch.nn.Linear) and m is not head}
        live_after.append(sum(1 for m in ours.values() if m.weight.device.type != "meta"))

    monkeypatch.setattr(DiskBlocks, "release", counting_release)
    del model
    compress_folder(tmp_path / "dense", LowRankConfig(method="rom", keep=0.75, chunk_size=3), tmp_path / "out",
                    calib=_calib(), progress=False, **_describes(tmp_path / "dense"))
    assert live_after and all(n == 0 for n in live_after), live_after


def test_forward_from_a_block_matches_the_full_forward():
    model, _ = load_model("tiny:gemma3")
    desc = describe(model)
    ids = _calib(2, 24)
    runner = BlockRunner(desc, ids, chunk_size=2)
    full = model(input_ids=ids, labels=ids).loss
    tuple_out = returns_tuple(desc, 0, runner.hidden[0], runner.calls[0][0])
    for i in range(len(desc.blocks)):
        torch.testing.assert_close(forward_from(desc, i, runner.hidden[0], ids, tuple_out, labels=ids).loss, full)
        runner.advance(i)


def test_ppl_search_accepts_within_tolerance_from_the_last_block(tmp_path):
    model, tok = load_model("tiny:llama")
    config = LowRankConfig(method="rom", keep=None, search="ppl", tolerance=1.02, n_samples=8, seq_len=32,
                           search_samples=4, chunk_size=4)
    report = compress(model, config, tokenizer=tok, progress=False)
    s = report.search
    trials = s["trials"]
    order = list(dict.fromkeys(t["layer"] for t in trials))
    assert order[0] == "model.layers.2.self_attn.q_proj" and order[-1].startswith("model.layers.0.")
    for name, rank in report.ranks.items():  # the smallest passing candidate was kept
        tried = [t for t in trials if t["layer"] == name]
        assert tried[-1]["rank"] == rank and tried[-1]["ppl"] <= tried[-1]["limit"]
        assert all(t["ppl"] > t["limit"] for t in tried[:-1])
    from s2d.lowrank.search import search_windows

    windows = search_windows(tok, config)
    with torch.no_grad():
        final = math.exp(float(model(input_ids=windows, labels=windows).loss))
    assert final == pytest.approx(s["ppl_final"], rel=1e-4)
    assert model_parameters(model) == report.summary["params_after"]


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1.2, -0.5])
def test_keep_outside_unit_interval_is_refused(keep):
    model, _ = load_model("tiny:llama")
    with pytest.raises(S2DError, match="keep"):
        compress(model, LowRankConfig(method="svd", keep=keep))


def test_rank_out_of_range_is_refused():
    model, _ = load_model("tiny:llama")
    for rank in (0, 65):
        with pytest.raises(S2DError, match="rank"):
            compress(model, LowRankConfig(method="svd", keep=None, ranks={"q": rank}))


def test_calibration_too_short_is_refused():
    model, tok = load_model("tiny:llama")
    with pytest.raises(S2DError, match="too short"):
        compress(model, LowRankConfig(method="rom", n_samples=100_000, seq_len=512), tokenizer=tok)
    with pytest.raises(S2DError, match="calib"):
        compress(model, LowRankConfig(method="rom"), calib=torch.zeros(0, 8, dtype=torch.long))


def test_missing_shard_and_mismatched_low_rank_block_are_refused(tmp_path):
    model, tok = load_model("tiny:llama")
    compress(model, LowRankConfig(method="svd", keep=0.8), progress=False)
    save(model, tmp_path / "lr", tok)
    config_path = tmp_path / "lr" / "config.json"
    config = json.loads(config_path.read_text())
    name = next(iter(config["low_rank"]["layers"]))
    config["low_rank"]["layers"][name]["rank"] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(S2DError, match="does not match"):
        load_model(tmp_path / "lr")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    next(iter(sorted((tmp_path / "sharded").glob("*.safetensors")))).unlink()
    with pytest.raises(S2DError, match="missing"):
        compress_folder(tmp_path / "sharded", LowRankConfig(method="svd"), tmp_path / "out2",
                        **_describes(tmp_path / "sharded"))
    config["low_rank"]["layers"][name]["rank"] -= 1
    (tmp_path / "sharded" / "config.json").write_text(json.dumps({**json.loads(
        (tmp_path / "sharded" / "config.json").read_text()), "low_rank": config["low_rank"]}))
    with pytest.raises(S2DError, match="missing"):
        load_model(tmp_path / "sharded")


def test_cli_compress_writes_a_run_folder_and_a_reloadable_model(tmp_path):
    from s2d.cli import main

    out = tmp_path / "run"
    assert main(["compress", "tiny:llama", "--method", "asvd", "--keep", "0.85", "--n-samples", "8",
                 "--seq-len", "32", "--eval", "ppl:wiki", "--ppl-tokens", "1024", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["ppl:wiki@128"]["n_input_tokens"] == 1024  # the slice --ppl-tokens asked for
    assert metrics["compression"]["summary"]["fraction_kept"] == pytest.approx(0.85, abs=0.005)
    assert (out / "figures" / "ranks.png").stat().st_size > 1000 and (out / "config.yaml").is_file()
    model, _ = load_model(out / "model")
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == len(metrics["compression"]["ranks"])
    assert main(["compress", "tiny:llama", "--keep", "1.5", "--out", str(tmp_path / "bad")]) == 2


def test_cli_search_tolerance_reaches_the_config_and_looser_compresses_more(tmp_path):
    from s2d.cli import main

    kept = {}
    for tol in ("1.0", "1.5"):
        out = tmp_path / tol
        assert main(["compress", "tiny:llama", "--search", "ppl", "--keep", "0.1", "--tolerance", tol,
                     "--n-samples", "8", "--seq-len", "32", "--no-model", "--out", str(out)]) == 0
        m = json.loads((out / "metrics.json").read_text())["compression"]
        assert m["config"]["tolerance"] == float(tol) == m["search"]["tolerance"]
        kept[tol] = m["summary"]["fraction_kept"]
    assert kept["1.5"] < kept["1.0"], kept


@pytest.mark.real
def test_smollm2_rom_on_the_last_blocks_hits_the_budget(smollm2, report_figure):
    import copy
    import time

    from s2d.assets import wiki_tokens

    model, tok = smollm2
    model = copy.deepcopy(model)
    total = model_parameters(model)
    ids = wiki_tokens(tok, "validation")[: 10 * 128].view(10, 128)
    calib, probe = ids[:8], ids[8:]
    with torch.no_grad():
        dense_loss = float(model(input_ids=probe, labels=probe).loss)
    config = LowRankConfig(method="rom", keep=0.99, chunk_size=4)
    t0 = time.perf_counter()
    # o and down only (576 outputs each), to keep the test short
    report = compress(model, config, filter=lambda m, n: n.endswith(("o_proj", "down_proj")), calib=calib,
                      progress=False)
    report_figure(f"SmolLM2 rom keep=0.99 (o, down) on 8x128 tokens: {time.perf_counter() - t0:.1f} s")
    assert model_parameters(model) == report.summary["params_after"]
    assert model_parameters(model) == pytest.approx(0.99 * total, rel=0.005)
    assert report.summary["blocks_decomposed"][-1] == 29
    assert {n.rsplit(".", 1)[-1] for n in report.ranks} == {"o_proj", "down_proj"}
    with torch.no_grad():
        loss = float(model(input_ids=probe, labels=probe).loss)
    assert math.isfinite(loss) and loss < dense_loss + 1.0
