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


@pytest.mark.parametrize("extra", [{"rotate": True}, {"smooth_alpha": 0.5}])
def test_weight_rewriting_baselines_refuse_a_low_rank_model(low_rank_llama, extra):
    model, ids = low_rank_llama
    with pytest.raises(S2DError, match="low-rank pair"):
        quantize(copy.deepcopy(model), QuantConfig.from_scheme("W4A4", **extra), calib=ids, progress=False)


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
