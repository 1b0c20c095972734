"""Per-Linear SQNR: `accumulated_db` measures the quantized model against the reference model's own forward,
so it includes the error of everything upstream; `local_db` only the layer's own error."""

import copy
import math

import pytest
import torch

from s2d.assets.tiny import tiny_model
from s2d.quant import QuantConfig, quantize
from s2d.quant.sqnr import layer_sqnr

LAYER = "model.layers.2.mlp.down_proj"  # last block: two blocks of quantization error upstream


def _tokens(n=2, seq=48, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    reference, _ = tiny_model("llama")
    quantized = quantize(copy.deepcopy(reference), QuantConfig.from_scheme("W4A4"))
    batch = _tokens()
    return reference, quantized, batch, layer_sqnr(reference, quantized, batch)


def _db(y, ref):
    return 10 * math.log10(ref.double().pow(2).sum().item() / (y.double() - ref.double()).pow(2).sum().item())


def test_accumulated_is_at_most_local_and_below_it_downstream(pair):
    _, _, _, sqnr = pair
    assert len(sqnr) == 21  # 7 Linears x 3 blocks
    assert all(v["accumulated_db"] <= v["local_db"] + 1e-6 for v in sqnr.values())
    # The first block's q/k/v see the same normalized embeddings in both models: nothing upstream is quantized,
    # so the two numbers agree. Every other Linear reads an output of a quantized Linear, so it is lower.
    first = {f"model.layers.0.self_attn.{r}_proj" for r in "qkv"}
    for name, v in sqnr.items():
        if name in first:
            assert v["accumulated_db"] == pytest.approx(v["local_db"], abs=1e-6)
        else:
            assert v["accumulated_db"] < v["local_db"] - 0.5, name


def test_both_numbers_match_a_plain_computation(pair):
    reference, quantized, batch, sqnr = pair
    seen = {}

    def grab(key):
        def fn(module, args, out):
            seen[key] = (args[0].detach(), out.detach())
        return fn

    handles = [reference.get_submodule(LAYER).register_forward_hook(grab("ref")),
               quantized.get_submodule(LAYER).register_forward_hook(grab("q"))]
    outs = {"ref": [], "q": []}
    try:
        with torch.no_grad():
            for i in range(batch.shape[0]):  # one sample at a time, as layer_sqnr's default chunk
                reference(batch[i : i + 1])
                outs["ref"].append(seen["ref"][1])
                quantized(batch[i : i + 1])
                x_q, y_q = seen["q"]
                outs["q"].append((x_q, y_q))
    finally:
        for h in handles:
            h.remove()
    ref_layer = copy.deepcopy(reference.get_submodule(LAYER))  # no hooks: the plain full-precision Linear
    with torch.no_grad():
        local_ref = torch.cat([ref_layer(x) for x, _ in outs["q"]])
    y_q = torch.cat([y for _, y in outs["q"]])
    y_ref = torch.cat(outs["ref"])
    entry = sqnr[LAYER]
    assert entry["local_db"] == pytest.approx(_db(y_q, local_ref), abs=1e-6)
    assert entry["accumulated_db"] == pytest.approx(_db(y_q, y_ref), abs=1e-6)
    assert entry["accumulated_db"] < entry["local_db"] - 1
