import pytest
import scipy.stats
import torch

from s2d.assets.tiny import tiny_model
from s2d.errors import S2DError
from s2d.regularize import (
    KURE,
    KUREConfig,
    S2DConfig,
    SelectiveSpectralDecay,
    SpectralNorm,
    SpectralNormConfig,
    WeightDecay,
    WeightDecayConfig,
    kurtosis,
    pcdr,
    top_singular,
)

DOWN0 = "model.layers.0.mlp.down_proj"  # 64 x 128 in tiny:llama


def only(name):
    return lambda module, qualified: qualified == name


def planted(shape=(64, 128), top=(8.0, 5.0, 3.0), seed=0) -> torch.Tensor:
    """A matrix with known singular values: `top`, then a flat tail decaying from 1 to 0.5."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=gen, dtype=torch.float64))
    r = min(shape)
    s = torch.cat([torch.tensor(top, dtype=torch.float64), torch.linspace(1.0, 0.5, r - len(top), dtype=torch.float64)])
    return (u[:, :r] * s) @ v[:, :r].T


def model_with(weight: torch.Tensor, name: str = DOWN0):
    model, _ = tiny_model("llama")
    with torch.no_grad():
        model.get_submodule(name).weight.copy_(weight.float())
    return model


@pytest.mark.parametrize("method", ["subspace", "full"])
def test_top_singular_matches_dense_svd(method):
    w = planted()
    u, s, v = top_singular(w, 3, method=method, iters=6)
    u_ref, s_ref, vh_ref = torch.linalg.svd(w)
    torch.testing.assert_close(s, s_ref[:3], rtol=1e-8, atol=0)
    for k in range(3):  # singular vectors are defined up to sign
        assert abs(float(u[:, k] @ u_ref[:, k])) == pytest.approx(1.0, abs=1e-8)
        assert abs(float(v[:, k] @ vh_ref[k])) == pytest.approx(1.0, abs=1e-8)


def test_pcdr_against_a_plain_loop_and_full_rank():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    x = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    ratios = pcdr(x, w, u[:, :3], s[:3], vh[:3].T)
    expected = torch.zeros(3, dtype=torch.float64)
    for row in x:
        y = w @ row
        i = int(y.abs().argmax())
        for k in range(1, 4):
            part = sum(s[r] * u[i, r] * (vh[r] @ row) for r in range(k))
            expected[k - 1] += abs(part) / abs(y[i]) / len(x)
    torch.testing.assert_close(ratios, expected)
    full = pcdr(x, w, u, s, vh.T)
    torch.testing.assert_close(full[-1], torch.tensor(1.0, dtype=torch.float64))


def test_coupled_gradient_is_the_selected_components():
    w = planted()
    model = model_with(w)
    lam, n = 0.3, 2
    reg = SelectiveSpectralDecay(model, S2DConfig(lam=lam, power=n, selection="all", svd="full"), only(DOWN0))
    weight = model.get_submodule(DOWN0).weight
    reg.penalty().backward()
    u, s, vh = torch.linalg.svd(weight.detach().double())
    expected = lam * ((u[:, :3] * s[:3] ** n) @ vh[:3])
    torch.testing.assert_close(weight.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_coupled_gradient_matches_finite_differences_of_the_true_objective():
    """d/dW [λ/(n+1) Σ_{k≤3} σ_k^{n+1}] by central differences on a small matrix, against the autograd gradient."""
    w = planted(shape=(6, 8), top=(4.0, 3.0, 2.0)).float()
    name = "model.layers.0.self_attn.k_proj"  # 32 x 64, holding the small matrix in its top-left corner
    model, _ = tiny_model("llama")
    lin = model.get_submodule(name)
    big = torch.zeros_like(lin.weight)
    big[:6, :8] = w
    with torch.no_grad():
        lin.weight.copy_(big)
    lam, n = 0.5, 2
    reg = SelectiveSpectralDecay(model, S2DConfig(lam=lam, power=n, selection="all", svd="full"), only(name))
    reg.penalty().backward()

    def objective(m):
        return lam / (n + 1) * (torch.linalg.svdvals(m)[:3] ** (n + 1)).sum()

    base, eps = big.double(), 1e-6
    for i, j in [(0, 0), (2, 5), (5, 7), (3, 1)]:
        plus, minus = base.clone(), base.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (objective(plus) - objective(minus)) / (2 * eps)
        assert float(lin.weight.grad[i, j]) == pytest.approx(float(fd), rel=1e-3, abs=1e-6)


def test_decoupled_step_shrinks_sigma_exactly():
    w = planted()
    model = model_with(w)
    lam, n, lr = 0.01, 2, 0.1
    reg = SelectiveSpectralDecay(model, S2DConfig(lam=lam, power=n, k_max=2, form="decoupled", selection="all",
                                                  svd="full"), only(DOWN0))
    before = torch.linalg.svdvals(model.get_submodule(DOWN0).weight.double())
    assert float(reg.penalty()) == 0.0
    reg.step(lr=lr)
    after = torch.linalg.svdvals(model.get_submodule(DOWN0).weight.double())
    expected = before.clone()
    expected[:2] -= lr * lam * before[:2] ** n
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_penalty_alone_shrinks_only_the_top_components():
    w = planted(top=(12.0, 2.0, 1.5))
    model = model_with(w)
    weight = model.get_submodule(DOWN0).weight
    reg = SelectiveSpectralDecay(model, S2DConfig(lam=1.0, power=2, k_max=1, selection="all", refresh_every=10),
                                 only(DOWN0))
    opt = torch.optim.SGD([weight], lr=2e-4)
    before = torch.linalg.svdvals(weight.detach().double())
    for _ in range(300):
        opt.zero_grad()
        reg.penalty().backward()
        opt.step()
        reg.step()
    after = torch.linalg.svdvals(weight.detach().double())
    assert after[0] < 0.8 * before[0]
    torch.testing.assert_close(after[4:], before[4:], rtol=0.01, atol=0)


def test_layer_below_tau_gets_no_gradient():
    """One layer with a dominant direction aligned to its inputs (PCDR≈1), one without (PCDR small)."""
    model, _ = tiny_model("llama")
    dominant, flat = DOWN0, "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(dominant).weight.copy_(planted(top=(50.0, 1.0, 1.0)).float())
        model.get_submodule(flat).weight.copy_(planted(top=(1.0, 1.0, 1.0), seed=3).float())
    reg = SelectiveSpectralDecay(model, S2DConfig(tau=0.9, k_max=1, svd="full"),
                                 lambda m, n: n in (dominant, flat))
    gen = torch.Generator().manual_seed(0)
    u, s, vh = torch.linalg.svd(model.get_submodule(dominant).weight.double())
    inputs = {dominant: (vh[0].float() * 3 + 0.05 * torch.randn(200, 128, generator=gen)),
              flat: torch.randn(200, 128, generator=gen)}
    record = reg.refresh(inputs)
    assert record["layers"][dominant]["k_target"] == 1
    assert record["layers"][flat]["k_target"] == 0
    assert record["layers"][flat]["pcdr"][0] < 0.9
    reg.penalty().backward()
    assert model.get_submodule(flat).weight.grad is None or not model.get_submodule(flat).weight.grad.any()
    assert model.get_submodule(dominant).weight.grad.abs().sum() > 0


def test_pcdr_selection_from_hooked_inputs():
    model, tok = tiny_model("llama")
    reg = SelectiveSpectralDecay(model, S2DConfig(tau=0.5, refresh_every=5))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids)  # the forward before the first penalty feeds the hooks
    reg.penalty()
    assert len(reg.log) == 1 and set(reg.log[0]["layers"]) == set(reg.targets)
    assert all(rec["pcdr"] is not None for rec in reg.log[0]["layers"].values())
    for _ in range(6):
        reg.step(lr=0.0)
        model(ids)
        reg.penalty()
    assert [r["step"] for r in reg.log] == [0, 5]


def test_state_dict_roundtrip():
    model = model_with(planted())
    reg = SelectiveSpectralDecay(model, S2DConfig(selection="all", form="decoupled"), only(DOWN0))
    reg.step(lr=0.01)
    state = reg.state_dict()
    other = SelectiveSpectralDecay(model_with(planted()), S2DConfig(selection="all", form="decoupled"), only(DOWN0))
    other.load_state_dict(state)
    assert other.steps == 1 and other._refreshed_at == reg._refreshed_at
    torch.testing.assert_close(other.factors[DOWN0]["s"], reg.factors[DOWN0]["s"])


@pytest.mark.parametrize(("config", "match"), [
    (S2DConfig(lam=-1.0), "lam"), (S2DConfig(tau=0.0), "tau"), (S2DConfig(tau=1.5), "tau"),
    (S2DConfig(k_max=100), "exceeds the rank"), (S2DConfig(form="sideways"), "form"),
])
def test_bad_config(config, match):
    with pytest.raises(S2DError, match=match):
        SelectiveSpectralDecay(tiny_model("llama")[0], config)


def test_command_line_options_reach_the_regularizer_as_numbers():
    # --reg-option lam=5e-4 arrives as the string "5e-4" from YAML; the config must hold the number.
    from s2d.regularize import make_regularizer

    model = tiny_model("llama")[0]
    reg = make_regularizer("s2d", model, {"lam": "5e-4", "form": "coupled"}, optimizer=None)
    assert reg.config.lam == 5e-4
    assert make_regularizer("specnorm", model, {"lam": "1e-3"}, optimizer=None).config.lam == 1e-3
    with pytest.raises(S2DError, match="unknown S2DConfig fields"):
        make_regularizer("s2d", model, {"lambda": 1.0}, optimizer=None)


def test_filter_selecting_nothing():
    with pytest.raises(S2DError, match="selects no Linear"):
        SelectiveSpectralDecay(tiny_model("llama")[0], S2DConfig(), lambda m, n: False)


def test_decoupled_needs_a_learning_rate():
    reg = SelectiveSpectralDecay(model_with(planted()), S2DConfig(form="decoupled", selection="all"), only(DOWN0))
    with pytest.raises(S2DError, match="learning rate"):
        reg.step()


def test_fold_norms_option_keeps_outputs():
    model, _ = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(3.0)
    ids = torch.randint(0, 256, (1, 12))
    before = model(ids).logits
    SelectiveSpectralDecay(model, S2DConfig(fold_norms=True))
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1.0)


def test_spectral_norm_baseline():
    model = model_with(planted())
    reg = SpectralNorm(model, SpectralNormConfig(lam=2.0, power_iters=30), only(DOWN0))
    value = reg.penalty()
    assert float(value.detach()) == pytest.approx(0.5 * 2.0 * 8.0**2, rel=1e-4)
    value.backward()
    weight = model.get_submodule(DOWN0).weight
    u, s, vh = torch.linalg.svd(weight.detach().double())
    torch.testing.assert_close(weight.grad.double(), 2.0 * s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-3, atol=1e-5)


def test_kure_matches_scipy_kurtosis():
    model, _ = tiny_model("llama")
    w = model.get_submodule(DOWN0).weight
    reference = scipy.stats.kurtosis(w.detach().flatten().numpy(), fisher=False)
    assert float(kurtosis(w.detach())) == pytest.approx(reference, rel=1e-4)
    reg = KURE(model, KUREConfig(lam=1.0, target=1.8), only(DOWN0))
    assert float(reg.penalty().detach()) == pytest.approx((float(kurtosis(w.detach())) - 1.8) ** 2, rel=1e-5)


def test_weight_decay_baseline_forms():
    model = model_with(planted())
    w0 = model.get_submodule(DOWN0).weight.detach().clone()
    reg = WeightDecay(model, WeightDecayConfig(lam=0.1, form="decoupled"), only(DOWN0))
    reg.step(lr=0.5)
    torch.testing.assert_close(model.get_submodule(DOWN0).weight.detach(), w0 * 0.95)
    coupled = WeightDecay(model, WeightDecayConfig(lam=0.1, form="coupled"), only(DOWN0))
    assert float(coupled.penalty()) == pytest.approx(0.05 * float((w0 * 0.95).pow(2).sum()), rel=1e-5)


# The residual writers by module name, written out per family without the adapters (roles= must agree with them).
WRITERS = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "gemma3": ("self_attn.o_proj", "mlp.down_proj"),
           "vit": ("attention.o_proj", "mlp.fc2"), "bert": (".output.dense",)}  # BERT: attention's and the MLP's


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_roles_restrict_s2d_to_the_residual_writers(family):
    model, _ = tiny_model(family)
    writers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(WRITERS[family])}
    reg = SelectiveSpectralDecay(model, S2DConfig(roles="o,down,fc2", selection="all", form="decoupled"))
    assert set(reg.targets) == writers and len(writers) >= 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.step(lr=0.1)
    changed = {n.removesuffix(".weight") for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == writers  # the decay touched the writers and nothing else


def test_roles_that_select_nothing_or_do_not_exist():
    with pytest.raises(S2DError, match="roles=fc2 select no Linear of this model; its roles are"):
        SelectiveSpectralDecay(tiny_model("llama")[0], S2DConfig(roles="fc2"))
    for bad in ("mlp", "", ","):
        with pytest.raises(S2DError, match="roles must be 'all' or a comma list"):
            S2DConfig(roles=bad).validate()


def test_roles_from_the_command_line():
    from s2d.regularize import make_regularizer

    model = tiny_model("llama")[0]
    reg = make_regularizer("s2d", model, {"roles": "o,down"}, optimizer=None)
    assert {n.rsplit(".", 1)[1] for n in reg.targets} == {"o_proj", "down_proj"}
