"""rank_multiple: every rank a multiple of a quantization group, so W4A4 with activation groups can follow."""

import pytest
import torch

from s2d.errors import S2DError
from s2d.lowrank import LowRankConfig
from s2d.lowrank.budget import Layer, plan_keep

pytestmark = pytest.mark.usefixtures("one_thread")


def _smollm2_shapes(blocks=30):
    shapes = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576), "gate": (576, 1536),
              "up": (576, 1536), "down": (1536, 576)}
    return [Layer(f"layers.{i}.{role}", role, i, d_in, d_out, False, True)
            for i in range(blocks) for role, (d_in, d_out) in shapes.items()]


@pytest.mark.parametrize("keep", [0.9, 0.8, 0.7])
@pytest.mark.parametrize("multiple", [8, 32])
def test_every_rank_is_a_multiple_and_the_count_lands_within_one_step(keep, multiple):
    layers, total = _smollm2_shapes(), 134_515_008
    plan = plan_keep(layers, layers, total, keep, multiple=multiple)
    assert plan.ranks and all(r % multiple == 0 and r >= multiple for r in plan.ranks.values())
    assert all(next(x for x in layers if x.name == n).saves(r) for n, r in plan.ranks.items())
    step = multiple * (1536 + 576)  # the largest one-step change of a single Linear's count
    assert total * keep - step <= plan.params_after() <= total * keep


def test_multiple_one_is_the_plain_budget():
    layers, total = _smollm2_shapes(), 134_515_008
    assert plan_keep(layers, layers, total, 0.8, multiple=1).ranks == plan_keep(layers, layers, total, 0.8).ranks


def test_bad_rank_multiples_are_refused():
    with pytest.raises(S2DError, match="rank_multiple must be a whole number"):
        LowRankConfig(rank_multiple=0).validate()
    with pytest.raises(S2DError, match="not with --search"):
        LowRankConfig(rank_multiple=8, search="ppl").validate()
    with pytest.raises(S2DError, match="not multiples of rank_multiple=8"):
        LowRankConfig(keep=None, ranks={"q": 12}, rank_multiple=8).validate()


def test_a_compressed_model_with_rank_multiple_takes_group_quantized_activations():
    from s2d.assets import load_model
    from s2d.lowrank import compress
    from s2d.lowrank.factorized import FactorizedLinear
    from s2d.quant import QuantConfig, quantize

    model, tok = load_model("tiny:llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    compress(model, LowRankConfig(method="svd", keep=0.8, rank_multiple=8, n_samples=4, seq_len=32), tokenizer=tok)
    ranks = [m.rank for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert ranks and all(r % 8 == 0 for r in ranks)
    config = QuantConfig.from_scheme("W4A4", a_granularity="per_group", a_group_size=8)
    q = quantize(model, config, calib={"input_ids": ids}, progress=False)
    assert torch.isfinite(q(input_ids=ids).logits).all()
