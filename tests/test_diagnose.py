"""Diagnose against plain references: concatenated statistics, a dense SVD, planted outliers, bad input."""

import math

import pytest
import torch

from s2d.arch import describe
from s2d.assets import load_model
from s2d.diagnose import DiagnoseConfig, PCDRAccumulator, RunningStats, collect, diagnose, summarize, weight_spectrum
from s2d.errors import S2DError


def _batches(n=6, size=2, seq=16, vocab=250, seed=0):
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i : i + size], "use_cache": False} for i in range(0, n, size)]


def _plain(x: torch.Tensor) -> dict:
    d = x.double().reshape(-1)
    c = d - d.mean()
    var = c.pow(2).mean()
    return {"max_abs": float(d.abs().max()), "mean": float(d.mean()), "std": float(var.sqrt()),
            "kurtosis": float(c.pow(4).mean() / var.pow(2))}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_streaming_statistics_equal_the_concatenated_activations():
    model, _ = load_model("tiny:llama")
    desc = describe(model)
    names = [desc.linears()[0].name, desc.linears()[-1].name]
    seen = {n: ([], []) for n in names}

    def keep(name):
        def hook(module, args, output):
            seen[name][0].append(args[0].detach().clone())
            seen[name][1].append(output.detach().clone())
        return hook

    hooks = [desc.module(n).register_forward_hook(keep(n)) for n in names]
    batches = _batches(n=5, size=2)  # uneven last batch on purpose
    result = collect(model, batches, DiagnoseConfig(), progress=False)
    for h in hooks:
        h.remove()
    by_name = {lin["name"]: lin for lin in result["linears"]}
    for name in names:
        for side, tensors in zip(("input", "output"), seen[name], strict=True):
            ref = _plain(torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors]))
            got = by_name[name][side]
            for key in ("max_abs", "mean", "std", "kurtosis"):
                assert _rel(got[key], ref[key]) < 1e-6, (name, side, key, got[key], ref[key])
            flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
            assert got["n"] == flat.numel()
            assert got["over_threshold"] == int((flat > 6).sum())
            assert _rel(got["median_abs"], float(flat.double().median())) < 0.03  # histogram resolution


def test_running_stats_merge_is_order_free():
    x = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(1)) * 5 + 2
    a, b = RunningStats(), RunningStats()
    for part in (x[:1], x[1:]):
        a.update(summarize(part, 6.0, 100.0, 4, 0))
    for part in (x[2:], x[:2]):
        b.update(summarize(part, 6.0, 100.0, 4, 0))
    for key in ("mean", "std", "kurtosis"):
        assert _rel(getattr(a, key), getattr(b, key)) < 1e-7
    ref = _plain(x)
    assert _rel(a.kurtosis, ref["kurtosis"]) < 1e-6
    assert torch.equal(a.channel_absmax, x.abs().reshape(-1, 8).amax(0))


def test_massive_entries_are_located():
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(2)) * 0.01
    x[1, 3, 7] = 500.0
    stats = RunningStats()
    stats.update(summarize(x, 6.0, 100.0, 4, sample0=10))
    out = stats.finish(top_channels=2, massive_ratio=1000.0)
    assert out["massive_count"] == 1
    assert out["massive"] == [{"value": 500.0, "sample": 11, "token": 3, "channel": 7}]
    assert out["top_channels"][0]["channel"] == 7


def test_spectrum_equals_a_dense_float64_svd():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    summary, (u, s, v) = weight_spectrum(w, top_k=3, keep=64)
    ref = torch.linalg.svd(w.double(), full_matrices=False).S
    assert torch.allclose(torch.tensor(summary["sigma"], dtype=torch.float64), ref, rtol=1e-10)
    assert math.isclose(summary["stable_rank"], float(ref.square().sum() / ref[0] ** 2), rel_tol=1e-10)
    assert math.isclose(summary["condition"], float(ref[0] / ref[-1]), rel_tol=1e-10)
    assert math.isclose(summary["energy_top"][2], float(ref[:3].square().sum() / ref.square().sum()), rel_tol=1e-10)
    assert torch.allclose(s, ref[:3], rtol=1e-8)
    assert torch.allclose((w.double() @ v).abs(), (u * s).abs(), atol=1e-6)


def test_pcdr_at_full_rank_is_one_and_tracks_the_peak_row():
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(4))
    _, factors = weight_spectrum(w, top_k=10, keep=10)
    acc = PCDRAccumulator(w, factors, budget=512, rows_per_batch=64)
    x = torch.randn(3, 7, 10, generator=torch.Generator().manual_seed(5))
    acc.update(x, x @ w.T)
    out = acc.finish()
    assert out["pcdr_rows"] == 21
    assert abs(out["pcdr"][-1] - 1.0) < 1e-9
    assert abs(out["pcdr_at_peak"][-1] - 1.0) < 1e-9


def _plant(module: torch.nn.Linear, factor: float) -> None:
    """Scale the weight's top singular value by `factor`, leaving every other component unchanged."""
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(module.weight.double(), full_matrices=False)
        module.weight += ((factor - 1) * s[0] * torch.outer(u[:, 0], vh[0])).float()


def test_planted_outlier_is_detected_ranked_first_and_dominated_by_sigma1():
    model, tok = load_model("tiny:llama")
    planted = describe(model).blocks[1].linears[0]  # a q projection: its output feeds no other Linear
    _plant(planted.module, 60.0)
    result = diagnose(model, tok, DiagnoseConfig(n_samples=4, seq_len=32, batch_size=2), progress=False)
    by_out = sorted(result["linears"], key=lambda lin: lin["output"]["max_abs"], reverse=True)
    by_sigma = sorted(result["linears"], key=lambda lin: lin["sigma1"], reverse=True)
    assert by_out[0]["name"] == planted.name
    assert by_sigma[0]["name"] == planted.name
    assert by_out[0]["pcdr_at_peak"][0] > 0.95
    assert by_out[0]["pcdr"][0] > 0.9
    assert any(planted.name in line for line in result["reading"])


def test_link_study_and_severity_are_complete():
    model, tok = load_model("tiny:qwen2")
    result = diagnose(model, tok, DiagnoseConfig(n_samples=4, seq_len=32, batch_size=4), progress=False)
    roles = {lin["role"] for lin in result["linears"]}
    assert set(result["link"]) == roles | {"all"}
    for preds in result["link"].values():
        assert set(preds) == {"sigma1", "pcdr1", "pcdr3"}
    c = result["link"]["all"]["sigma1"]
    assert c["n"] == len(result["linears"]) and -1 <= c["spearman"] <= 1 and 0 <= c["spearman_p"] <= 1
    sev = result["severity"]
    assert sev["sigma1_p50"] <= sev["sigma1_p90"] <= sev["sigma1_p99"] <= sev["sigma1_max"]
    assert sev["max_abs"] == max(sev["residual_max_abs"], sev["linear_max_abs"])


@pytest.mark.parametrize("spec", ["tiny:bert", "tiny:gemma3"])
def test_other_text_families(spec):
    model, tok = load_model(spec)
    result = diagnose(model, tok, DiagnoseConfig(n_samples=2, seq_len=24, batch_size=2), progress=False)
    assert len(result["residual"]) == len(describe(model).blocks)
    assert all(len(lin["pcdr"]) == 3 for lin in result["linears"])


def test_vit_is_calibrated_on_images():
    model, processor = load_model("tiny:vit")
    result = diagnose(model, processor, DiagnoseConfig(data="digits", n_samples=6, batch_size=4), progress=False)
    assert result["samples"] == 6
    with pytest.raises(S2DError, match="needs images"):
        diagnose(model, processor, DiagnoseConfig(data="wiki"), progress=False)


def test_nan_activations_name_the_first_layer():
    model, tok = load_model("tiny:llama")
    block = describe(model).blocks[1]
    with torch.no_grad():
        block.module.input_layernorm.weight[0] = float("inf")
    with pytest.raises(S2DError, match=rf"input of {block.linears[0].name}\b"):
        collect(model, _batches(n=2), DiagnoseConfig(), progress=False)


def test_nan_weights_name_the_linear():
    model, tok = load_model("tiny:llama")
    lin = describe(model).blocks[2].linears[3]
    with torch.no_grad():
        lin.module.weight[0, 0] = float("nan")
    with pytest.raises(S2DError, match=rf"weight of {lin.name} "):
        collect(model, _batches(n=2), DiagnoseConfig(), progress=False)


def test_model_without_targeted_linears_is_an_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=0,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(S2DError, match="no targeted Linears"):
        collect(model, _batches(n=2, vocab=60), DiagnoseConfig(), progress=False)


@pytest.mark.parametrize("field,value,match", [("n_samples", 0, "n-samples"), ("seq_len", 1, "seq-len"),
                                               ("data", "imagenet", "unknown --data")])
def test_bad_config_is_an_error(field, value, match):
    with pytest.raises(S2DError, match=match):
        DiagnoseConfig(**{field: value}).validate()


def test_seq_len_beyond_positions_is_an_error():
    model, tok = load_model("tiny:llama")
    limit = model.config.max_position_embeddings
    with pytest.raises(S2DError, match="positions"):
        diagnose(model, tok, DiagnoseConfig(seq_len=limit + 1), progress=False)


@pytest.mark.real
def test_smollm2_massive_activations_are_found_and_attributed(smollm2, report_figure):
    import time

    model, tok = smollm2
    t0 = time.perf_counter()
    result = diagnose(model, tok, DiagnoseConfig(n_samples=4, seq_len=128), progress=False)
    report_figure(f"diagnose SmolLM2 (4 x 128 tokens): {time.perf_counter() - t0:.1f} s")
    massive = [r["block"] for r in result["residual"] if r["massive_count"] > 0]
    assert massive and 10 <= massive[0] <= 13
    peak = max(r["max_abs"] for r in result["residual"])
    assert 1e4 < peak < 1e5
    writer = max(result["linears"], key=lambda lin: lin["output"]["max_abs"])
    assert writer["role"] == "down" and writer["block"] == massive[0]
    assert writer["name"] in result["reading"][1]
