"""Low-rank numerics against plain references: factors, full-rank exactness, streaming statistics, budgets."""

import numpy as np
import pytest
import torch
from torch import nn

from s2d.errors import S2DError
from s2d.lowrank.asvd import InputGram, asvd_factors
from s2d.lowrank.budget import Layer, plan_keep, plan_ranks
from s2d.lowrank.factorized import FactorizedLinear, break_even_rank
from s2d.lowrank.rom import GramOutputStats, OutputStats, principal_directions, rom_factors
from s2d.lowrank.svd import svd_factors

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(d_in, d_out, bias, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    if bias:
        nn.init.normal_(lin.bias, std=0.5)
    return lin


def _inputs(n, d_in, seed=1, anisotropic=True):
    """Correlated inputs with a non-zero mean and a few large channels, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen) @ torch.randn(d_in, d_in, generator=gen) / d_in**0.5
    if anisotropic:
        x[:, :3] *= 20
    return x + 0.3


def _stats(lin, x, chunks=4):
    out, gram = OutputStats(lin.out_features), InputGram(lin.in_features)
    for part in x.chunk(chunks):
        with torch.no_grad():
            out.update(lin(part))
        gram.update(part)
    return out, gram


def _factors(method, lin, x, max_rank=None):
    out, gram = _stats(lin, x)
    if method == "svd":
        return svd_factors(lin.weight, lin.bias, max_rank)
    if method == "asvd":
        return asvd_factors(lin.weight, lin.bias, gram, damp=1e-10, max_rank=max_rank)
    return rom_factors(lin.weight, lin.bias, out, max_rank)


# -- FactorizedLinear ---------------------------------------------------------------------------------------


def test_factorized_linear_counts_and_dense_equivalent():
    a, b, bias = torch.randn(5, 12), torch.randn(7, 5), torch.randn(7)
    layer = FactorizedLinear.from_factors(a, b, bias)
    assert (layer.in_features, layer.out_features, layer.rank) == (12, 7, 5)
    assert layer.num_parameters() == sum(p.numel() for p in layer.parameters()) == 5 * 12 + 7 * 5 + 7
    assert layer.macs_per_token() == 5 * 12 + 7 * 5
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), x @ (b @ a).T + bias)
    torch.testing.assert_close(layer.to_dense()(x), layer(x), atol=1e-5, rtol=1e-5)
    assert break_even_rank(12, 7) == pytest.approx(84 / 19)


@pytest.mark.parametrize("rank", [0, -1, 8, 2.5])
def test_factorized_linear_rejects_bad_rank(rank):
    with pytest.raises(S2DError, match="rank"):
        FactorizedLinear(12, 7, rank)


# -- every method is exact at full rank ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "asvd", "rom"])
@pytest.mark.parametrize("d_in,d_out,bias", [(24, 16, False), (16, 40, True), (20, 20, True)])
def test_full_rank_reproduces_the_layer(method, d_in, d_out, bias):
    lin = _layer(d_in, d_out, bias)
    factors = _factors(method, lin, _inputs(400, d_in))
    assert factors.max_rank == min(d_in, d_out)
    full = factors.linear(factors.max_rank)
    x = _inputs(50, d_in, seed=7)  # fresh inputs, not the calibration ones
    with torch.no_grad():
        torch.testing.assert_close(full(x), lin(x), atol=1e-5, rtol=1e-5)


# -- rom ------------------------------------------------------------------------------------------------------


def test_streaming_rom_equals_the_computation_on_concatenated_outputs():
    lin = _layer(24, 32, True)
    x = _inputs(300, 24)
    stats, _ = _stats(lin, x, chunks=7)
    with torch.no_grad():
        y = lin(x).double().numpy()
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / len(y)  # numpy on all outputs at once
    torch.testing.assert_close(stats.covariance(), torch.from_numpy(cov), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(stats.mean(), torch.from_numpy(mu), atol=1e-12, rtol=1e-12)
    values, vectors = np.linalg.eigh(cov)
    v = vectors[:, ::-1][:, :6]
    w, b0 = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    ref_w = v @ v.T @ w
    ref_b = mu + v @ v.T @ (b0 - mu)
    f = rom_factors(lin.weight, lin.bias, stats).linear(6, dtype=torch.float64)
    torch.testing.assert_close((f.B.weight @ f.A.weight), torch.from_numpy(ref_w.copy()), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(f.B.bias, torch.from_numpy(ref_b.copy()), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_in,d_out", [(12, 40), (40, 12)])
def test_output_statistics_from_the_shared_input_equal_the_direct_ones(bias, d_in, d_out):
    lin = _layer(d_in, d_out, bias).double()  # float64 outputs, so the two routes differ only by rounding
    x = _inputs(250, d_in).double()
    direct, gram = _stats(lin, x, chunks=5)
    derived = GramOutputStats(gram, lin.weight, lin.bias)
    assert derived.n == direct.n == 250
    torch.testing.assert_close(derived.mean(), direct.mean(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(derived.covariance(), direct.covariance(), atol=1e-9, rtol=1e-9)
    # The factored route (SVD through the d_in side) gives the eigenpairs of the d_out x d_out covariance.
    values, vectors = principal_directions(derived)
    k = min(d_in, d_out)
    assert values.shape == (k,) and vectors.shape == (d_out, k)
    torch.testing.assert_close(values, principal_directions(direct)[0][:k], atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(direct.covariance() @ vectors, vectors * values, atol=1e-8, rtol=1e-8)
    for rank in (1, k // 2, k):
        a = rom_factors(lin.weight, lin.bias, derived).linear(rank, dtype=torch.float64)
        b = rom_factors(lin.weight, lin.bias, direct).linear(rank, dtype=torch.float64)
        torch.testing.assert_close(a.B.weight @ a.A.weight, b.B.weight @ b.A.weight, atol=1e-8, rtol=1e-7)
        torch.testing.assert_close(a.B.bias, b.B.bias, atol=1e-8, rtol=1e-7)


def test_effective_rank_matches_a_plain_loop():
    from s2d.lowrank.structure import effective_rank

    energy = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])
    for fraction in (0.5, 0.8, 0.9, 0.95, 0.99):
        k, acc = 0, 0.0
        while acc < fraction * 10.0:
            acc += float(energy[k])
            k += 1
        assert effective_rank(energy, fraction) == k


def test_eigenvectors_are_orthonormal_and_sorted():
    lin = _layer(16, 30, False)
    stats, _ = _stats(lin, _inputs(200, 16))
    values, vectors = principal_directions(stats)
    assert torch.all(values[:-1] >= values[1:])
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(30, dtype=torch.float64), atol=1e-10, rtol=0)
    cov = stats.covariance()
    torch.testing.assert_close(cov @ vectors, vectors * values, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("bias", [False, True])
def test_mean_compensation_makes_the_mean_output_exact(bias):
    lin = _layer(24, 32, bias)
    x = _inputs(500, 24)
    stats, _ = _stats(lin, x)
    f = rom_factors(lin.weight, lin.bias, stats).linear(3)
    with torch.no_grad():
        torch.testing.assert_close(f(x).mean(0), lin(x).mean(0), atol=1e-4, rtol=1e-5)
        # Without the compensation (bias V_rV_rᵀb only, as in the original code) the mean is off.
        v = f.B.weight.double()
        b0 = lin.bias.double() if bias else torch.zeros(32, dtype=torch.float64)
        uncompensated = (x.double() @ (v @ f.A.weight.double()).T + v @ v.T @ b0).mean(0)
        assert (uncompensated - lin(x).double().mean(0)).abs().max() > 1e-2


# -- asvd ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 4, 8, 15])
def test_asvd_error_on_calibration_inputs_is_no_larger_than_svd(rank):
    lin = _layer(24, 32, True)
    x = _inputs(400, 24)
    errors = {}
    with torch.no_grad():
        y = x.double() @ lin.weight.double().T + lin.bias.double()
        for method in ("svd", "asvd"):
            f = _factors(method, lin, x).linear(rank, dtype=torch.float64)
            errors[method] = float((f(x.double()) - y).norm())
    assert errors["asvd"] <= errors["svd"] * (1 + 1e-9)
    if rank < 15:
        assert errors["asvd"] < 0.9 * errors["svd"]  # on anisotropic inputs whitening helps clearly


def test_asvd_dampens_rank_deficient_inputs():
    lin = _layer(24, 16, False)
    x = _inputs(10, 24)  # 10 rows, 24 channels: XᵀX is singular
    _, gram = _stats(lin, x, chunks=2)
    f = asvd_factors(lin.weight, lin.bias, gram, damp=0.0)
    assert torch.isfinite(f.a).all() and torch.isfinite(f.b).all()


# -- budgets -------------------------------------------------------------------------------------------------


def _llama_layers(d, ff, kv, n_blocks, factor_bias=False):
    shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, ff), "up": (d, ff), "down": (ff, d)}
    return [Layer(f"layers.{i}.{role}", role, i, d_in, d_out, False, factor_bias)
            for i in range(n_blocks) for role, (d_in, d_out) in shapes.items()]


@pytest.mark.parametrize("keep,blocks,b", [(0.9, 8, 0.60), (0.8, 12, 0.46), (0.5, 24, 0.33)])
def test_budget_follows_the_papers_llama7b_presets(keep, blocks, b):
    layers = _llama_layers(4096, 11008, 4096, 32)
    total = 6_738_415_616  # LLaMA-7B as the papers count it
    plan = plan_keep(layers, layers, total, keep)
    assert abs(len(plan.blocks) - blocks) <= 1 and plan.blocks[-1] == 31
    assert plan.b == pytest.approx(b, abs=0.02)
    assert plan.params_after() <= keep * total
    assert plan.params_after() == pytest.approx(keep * total, rel=1e-4)


@pytest.mark.parametrize("keep", [0.95, 0.9, 0.8, 0.7, 0.5])
@pytest.mark.parametrize("schedule", ["tail", "uniform"])
def test_budget_lands_on_the_requested_fraction(keep, schedule):
    layers = _llama_layers(576, 1536, 192, 30, factor_bias=True)
    total = 134_515_008
    plan = plan_keep(layers, layers, total, keep, schedule)
    assert total * keep - 2 * (576 + 1536) <= plan.params_after() <= total * keep
    for layer in layers:  # never a rank that saves nothing, and uniform b up to the one-rank top-up
        if layer.name in plan.ranks:
            r = plan.ranks[layer.name]
            assert layer.saves(r) and r - int(plan.b * layer.kappa) in (0, 1)
    if schedule == "uniform":
        assert plan.blocks == list(range(30))


def test_budget_rejects_bad_keep_and_bad_ranks():
    layers = _llama_layers(64, 128, 32, 3)
    for keep in (0, -0.1, 1.5):
        with pytest.raises(S2DError, match="keep"):
            plan_keep(layers, layers, 200_000, keep)
    with pytest.raises(S2DError, match="out of reach"):
        plan_keep(layers, layers, 120_000, 0.05)
    for rank in (0, -3, 65):
        with pytest.raises(S2DError, match="rank"):
            plan_ranks(layers, layers, 200_000, {"q": rank})
    with pytest.raises(S2DError, match="roles"):
        plan_ranks(layers, layers, 200_000, {"qkv": 4})


def test_explicit_ranks_by_role_keep_pointless_ranks_dense():
    layers = _llama_layers(64, 128, 32, 3)
    plan = plan_ranks(layers, layers, 200_000, {"q": 8, "k": 30})  # k is 64→32: κ≈21.3, so 30 saves nothing
    assert plan.ranks == {f"layers.{i}.q": 8 for i in range(3)}
    assert plan.kept_dense == [f"layers.{i}.k" for i in range(3)]
