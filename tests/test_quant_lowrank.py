"""Quantizing a low-rank model: both Linears of every low-rank pair are quantized (RTN and GPTQ)."""

import copy

import pytest
import torch

from s2d import load_model
from s2d.errors import S2DError
from s2d.lowrank import FactorizedLinear, LowRankConfig, compress
from s2d.quant import QuantConfig, QuantLinear, quantize


@pytest.fixture(scope="module")
def low_rank_llama():
    model, _ = load_model("tiny:llama")
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    compress(model, LowRankConfig(method="rom", keep=0.8, n_samples=8, seq_len=32), calib=ids, progress=False)
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    return model, ids


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_both_linears_of_each_low_rank_pair_are_quantized(low_rank_llama, method):
    model, ids = low_rank_llama
    q = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A8", method=method), calib=ids, progress=False)
    pairs = [m for m in q.modules() if isinstance(m, FactorizedLinear)]
    assert pairs and all(isinstance(p.A, QuantLinear) and isinstance(p.B, QuantLinear) for p in pairs)
    dense = [m for m in q.modules() if type(m) is torch.nn.Linear]
    assert len(dense) == 1  # only the LM head stays full precision
    with torch.no_grad():
        assert _rel(q(ids).logits, model(ids).logits) > 0  # the quantized pairs change the output


def test_gptq_beats_rtn_on_a_low_rank_model(low_rank_llama):
    model, ids = low_rank_llama
    with torch.no_grad():
        ref = model(ids).logits
        errs = {m: _rel(quantize(copy.deepcopy(model), QuantConfig.from_scheme("W3A16", method=m), calib=ids,
                                 progress=False)(ids).logits, ref) for m in ("rtn", "gptq")}
    assert errs["gptq"] < errs["rtn"], errs


def test_smoothquant_refuses_a_low_rank_model(low_rank_llama):
    model, ids = low_rank_llama
    with pytest.raises(S2DError, match="low-rank pair"):
        quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A4", smooth_alpha=0.5), calib=ids, progress=False)


def test_rotating_a_low_rank_model_preserves_its_function(low_rank_llama):
    from s2d.quant.rotate import RotatedLinear, rotate_model

    model, ids = low_rank_llama
    rotated = rotate_model(copy.deepcopy(model))
    with torch.no_grad():
        assert _rel(rotated(ids).logits, model(ids).logits) < 1e-5
    pairs = {n: m for n, m in rotated.named_modules() if isinstance(m, FactorizedLinear)}
    down = [m for n, m in pairs.items() if n.endswith("down_proj")]
    assert down and all(isinstance(m.A, RotatedLinear) for m in down)  # online rotation in front of A
    # every other pair was turned, not wrapped: its weights changed
    dense = dict(model.named_modules())
    for name, m in pairs.items():
        if not name.endswith("down_proj"):
            assert not torch.equal(m.A.weight, dense[name].A.weight) or not torch.equal(m.B.weight,
                                                                                        dense[name].B.weight)


def test_fold_into_a_low_rank_pair_absorbs_the_norms_gain_and_shift():
    from s2d.arch.fold import fold_into_linear as _fold_into

    gen = torch.Generator().manual_seed(0)
    for bias in (torch.randn(5, generator=gen), None):  # B without a bias gets one for W·β
        pair = FactorizedLinear.from_factors(torch.randn(3, 8, generator=gen), torch.randn(5, 3, generator=gen), bias)
        before = copy.deepcopy(pair)
        gain, shift = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
        x = torch.randn(4, 8, generator=gen)
        with torch.no_grad():
            _fold_into(pair, gain, shift)
            assert isinstance(pair, FactorizedLinear) and pair.rank == 3  # still a pair, same rank
            assert torch.allclose(pair(x), before(x * gain + shift), atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w4a4_with_rotation_on_a_low_rank_model_saves_and_reloads(low_rank_llama, method, tmp_path):
    from s2d.quant import save_quantized

    model, ids = low_rank_llama
    q = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A4", method=method, rotate=True), calib=ids,
                 progress=False)
    pairs = {n: m for n, m in q.named_modules() if isinstance(m, FactorizedLinear)}
    assert pairs and all(isinstance(p.A, QuantLinear) and isinstance(p.B, QuantLinear) for p in pairs.values())
    assert all(p.A.rotation is not None for n, p in pairs.items() if n.endswith("down_proj"))
    save_quantized(q, tmp_path / "q")
    back, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


def test_quantized_low_rank_model_saves_and_reloads_bit_identically(low_rank_llama, tmp_path):
    from s2d.quant import save_quantized

    model, ids = low_rank_llama
    q = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A8"), calib=ids, progress=False)
    save_quantized(q, tmp_path / "q")
    back, _ = load_model(tmp_path / "q")
    pairs = [m for m in back.modules() if isinstance(m, FactorizedLinear)]
    assert pairs and all(isinstance(p.A, QuantLinear) and isinstance(p.B, QuantLinear) for p in pairs)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
