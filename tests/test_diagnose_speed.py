"""The fast diagnose against the exact one: Gram-based spectra against dense SVDs (hard spectra included), the
faster streaming statistics against plain references, and a whole tiny-model diagnosis fast vs exact."""

import dataclasses
import math

import pytest
import torch

from s2d.assets import load_model
from s2d.diagnose import DiagnoseConfig, diagnose, summarize, weight_spectrum
from s2d.diagnose.gram import gram_spectrum, sigma_bound
from s2d.diagnose.stats import _BINS, _HI, _LO, log_bins
from s2d.errors import S2DError

SIGMA_RTOL = 1e-6  # what s2d.diagnose.gram promises for every reported σ


def _matrix(m, n, sigmas, seed=0):
    """A random m×n matrix with the given singular values (random orthonormal factors)."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return (u * torch.as_tensor(sigmas, dtype=torch.float64)) @ v.T


CASES = {
    "gaussian tall": lambda: torch.randn(300, 120, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
    "gaussian wide": lambda: torch.randn(90, 260, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
    "ill-conditioned 1e7": lambda: _matrix(200, 200, torch.logspace(0, -7, 200)),
    "clustered top": lambda: _matrix(150, 240, torch.cat([torch.tensor([5.0, 5.0 - 1e-9, 5.0 - 2e-9, 4.0]),
                                                          torch.linspace(1, 0.5, 146)])),
    "spike over a flat bulk": lambda: _matrix(400, 100, torch.cat([torch.tensor([80.0]), torch.ones(99)])),
    "rank-deficient": lambda: _matrix(120, 80, torch.cat([torch.linspace(3, 1, 60), torch.zeros(20)])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_spectrum_equals_the_dense_svd(case, one_thread):
    w = CASES[case]()
    ref = torch.linalg.svdvals(w)
    fast, (u, s, v) = weight_spectrum(w, top_k=3, keep=64, method="fast")
    exact, _ = weight_spectrum(w, top_k=3, keep=64, method="exact")
    got = torch.tensor(fast["sigma"], dtype=torch.float64)
    assert torch.allclose(got, ref[:64], rtol=SIGMA_RTOL, atol=1e-12 * float(ref[0])), case
    fro2 = float(w.square().sum())
    assert math.isclose(fast["stable_rank"], fro2 / float(ref[0]) ** 2, rel_tol=1e-12)
    assert math.isclose(fast["stable_rank"], exact["stable_rank"], rel_tol=1e-10)
    for a, b in zip(fast["energy_top"], exact["energy_top"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-9)
    if math.isinf(exact["condition"]) or exact["condition"] > 1e12:  # σ_min is rounding noise in both paths
        assert fast["condition"] > 1e12
    else:
        assert math.isclose(fast["condition"], exact["condition"], rel_tol=1e-6)
    # the factors are singular triplets: W v = σ u and Wᵀ u = σ v, orthonormal
    assert torch.allclose(w @ v, u * s, atol=1e-9 * float(ref[0]))
    assert torch.allclose(w.T @ u, v * s, atol=1e-9 * float(ref[0]))
    assert torch.allclose(v.T @ v, torch.eye(3, dtype=torch.float64), atol=1e-9)


def test_ill_conditioned_sigma_falls_back_to_svdvals():
    w = CASES["ill-conditioned 1e7"]()
    lam = torch.linalg.eigvalsh(w.T @ w).flip(0)
    # the bound says the Gram matrix cannot give σ_min here, and indeed its sqrt is off by far more than 1e-6
    assert float(sigma_bound(lam, float(w.square().sum()), *w.shape)[-1]) > 1e-6
    assert abs(float(lam[-1].clamp_min(0).sqrt()) / 1e-7 - 1) > 1e-6
    s, _ = gram_spectrum(w, 3)
    assert math.isclose(float(s[-1]), 1e-7, rel_tol=1e-6)


def test_sigma_bound_holds_on_well_conditioned_matrices():
    for seed in range(4):
        w = torch.randn(257, 96, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        lam = torch.linalg.eigvalsh(w.T @ w).flip(0)
        ref = torch.linalg.svdvals(w)
        err = (lam.sqrt() - ref).abs() / ref
        assert bool((err <= sigma_bound(lam, float(w.square().sum()), *w.shape)).all())


def test_float32_weights_give_the_same_spectrum():
    w = torch.randn(192, 64, generator=torch.Generator().manual_seed(5))
    fast, _ = weight_spectrum(w, top_k=3, keep=8, method="fast")
    exact, _ = weight_spectrum(w, top_k=3, keep=8, method="exact")
    for a, b in zip(fast["sigma"], exact["sigma"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-10)


def test_faster_statistics_match_float64_references():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 50, 96, generator=gen) * 4 + 0.01  # the mean is far below mean |x|
    x[2, 7, 11] = 3000.0
    b = summarize(x, 6.0, 100.0, 4, 0)
    d = x.double().reshape(-1)
    mean = float(d.mean())
    c = d - mean
    assert math.isclose(b.mean, mean, rel_tol=1e-9)
    for got, ref in ((b.m2, c.pow(2).sum()), (b.m3, c.pow(3).sum()), (b.m4, c.pow(4).sum())):
        assert math.isclose(got, float(ref), rel_tol=1e-6)
    assert b.max_abs == 3000.0 and b.big == 1 and b.over == int((d.abs() > 6).sum())
    ref_hist = torch.histc(x.abs().clamp_min(1e-30).log10().clamp(_LO, _HI - 1e-6), bins=_BINS, min=_LO, max=_HI)
    assert torch.equal(b.hist, ref_hist.double())


def test_log_bins_equal_histc_at_the_edges():
    # values at and next to every bin edge: the float32 bin index must round as histc's does
    edges = 10 ** torch.linspace(_LO, _HI, _BINS + 1, dtype=torch.float64)
    near = torch.cat([edges * (1 + f) for f in (-1e-6, 0.0, 1e-6)]).float()
    vals = torch.cat([near, torch.tensor([0.0, 1e-40, 1e9, float(10**_HI)])])
    ref = torch.histc(vals.clamp_min(1e-30).log10().clamp(_LO, _HI - 1e-6), bins=_BINS, min=_LO, max=_HI)
    assert torch.equal(log_bins(vals), ref.double())


def _numbers(result):
    """Every number the report shows, by a stable key."""
    out = {}
    for lin in result["linears"]:
        for key in ("sigma1", "stable_rank", "condition"):
            out[(lin["name"], key)] = lin[key]
        for i, value in enumerate(lin["sigma"] + lin["energy_top"] + lin["pcdr"] + lin["pcdr_at_peak"]):
            out[(lin["name"], "vec", i)] = value
        for side in ("input", "output"):
            for key in ("max_abs", "mean", "std", "kurtosis", "median_abs", "over_threshold", "massive_count"):
                out[(lin["name"], side, key)] = lin[side][key]
    for r in result["residual"]:
        for key in ("max_abs", "kurtosis", "median_abs", "massive_count"):
            out[("residual", r["block"], key)] = r[key]
    for key, value in result["severity"].items():
        out[("severity", key)] = value
    return out


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_tiny_model_diagnosis_is_the_same_fast_and_exact(family, one_thread):
    model, tok = load_model(f"tiny:{family}")
    config = DiagnoseConfig(n_samples=4, seq_len=32, batch_size=2)
    fast = diagnose(model, tok, config, progress=False)
    exact = diagnose(model, tok, dataclasses.replace(config, spectra="exact"), progress=False)
    a, b = _numbers(fast), _numbers(exact)
    assert a.keys() == b.keys()
    worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a)
    assert worst < 1e-6, worst
    assert all(lin["spectrum_method"] == "fast" for lin in fast["linears"])
    assert all(lin["spectrum_method"] == "exact" for lin in exact["linears"])
    assert fast["reading"] == exact["reading"]


def test_spectra_choice_is_validated_and_saved():
    assert DiagnoseConfig().spectra == "fast"
    assert DiagnoseConfig.from_yaml(DiagnoseConfig(spectra="exact").to_yaml()).spectra == "exact"
    with pytest.raises(S2DError, match="unknown spectra"):
        DiagnoseConfig(spectra="lanczos").validate()
