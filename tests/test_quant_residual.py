"""residual_bits: the residual stream quantized at every block's output, against a hand-written loop (static
per-tensor scales from the whole calibration batch, dynamic per-token rounding), saved and reloaded bit for bit,
on a decoder, an encoder and a ViT."""

import copy

import pytest
import torch

from s2d.arch import describe
from s2d.assets.tiny import tiny_model
from s2d.errors import S2DError
from s2d.quant import QuantConfig, prepare_qat, quantize

STATIC = dict(a_static=True, a_granularity="per_tensor")
FAMILIES = ["llama", "gemma3", "bert", "vit"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _calib(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(8, 1, 28, 28, generator=g)}
    return {"input_ids": torch.randint(0, 256, (4, 24), generator=g)}


def _out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output


def _rounded(x, scale, qmax):
    return torch.round(x / scale).clamp(-qmax - 1, qmax) * scale


class _ByHand:
    """Forward hooks on a weight-only copy's blocks: record each block's output, or round it as told."""

    def __init__(self, model, round_with=None):
        self.seen, self.handles = {}, []
        for i, block in enumerate(describe(model).blocks):
            self.handles.append(block.module.register_forward_hook(self._hook(i, round_with)))

    def _hook(self, i, round_with):
        def hook(module, args, output):
            x = _block_output(output)
            self.seen.setdefault(i, []).append(x.detach().clone())
            if round_with is None:
                return None
            y = round_with(i, x)
            return (y, *output[1:]) if isinstance(output, tuple) else y
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_static_residual_scales_and_rounding_match_a_plain_loop(family):
    model, _ = tiny_model(family)
    calib, test = _calib(family), _calib(family, seed=1)
    bits, qmax = 6, 2 ** 5 - 1
    # The reference: the same W8 weights with every activation in float; each block's scale is the largest |x| of
    # its output over the calibration batch (min-max, restricted symmetric grid), then the outputs rounded by hand.
    weights_only = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W8A16"), progress=False)
    record = _ByHand(weights_only)
    _out(weights_only, calib)
    record.remove()
    scales = {i: float(torch.cat([x.flatten() for x in xs]).abs().max()) / qmax for i, xs in record.seen.items()}
    rounding = _ByHand(weights_only, lambda i, x: _rounded(x, scales[i], qmax))
    expected = _out(weights_only, test)
    rounding.remove()

    config = QuantConfig.from_scheme("W8A16", residual_bits=bits, **STATIC)
    q = quantize(copy.deepcopy(model), config, calib=calib, chunk_size=2, progress=False)  # scales over chunks
    got = {i: float(b.module.s2d_residual.act_scale) for i, b in enumerate(describe(q).blocks)}
    assert got == pytest.approx(scales, rel=1e-6)
    assert torch.allclose(_out(q, test), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, _out(weights_only, test), atol=1e-3)  # the rounding is felt


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_dynamic_residual_rounding_is_per_token(family):
    model, _ = tiny_model(family)
    test = _calib(family, seed=1)
    weights_only = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W8A16"), progress=False)
    qmax = 2 ** 3 - 1

    def per_token(i, x):
        return _rounded(x, x.abs().amax(dim=-1, keepdim=True) / qmax, qmax)

    rounding = _ByHand(weights_only, per_token)
    expected = _out(weights_only, test)
    rounding.remove()
    q = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W8A16", residual_bits=4), progress=False)
    assert torch.allclose(_out(q, test), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_residual_quantized_model_reloads_identically(tmp_path, family):
    from s2d import load_model
    from s2d.quant import save_quantized

    model, tokenizer = tiny_model(family)
    calib = _calib(family)
    config = QuantConfig.from_scheme("W4A8", residual_bits=6, **STATIC)
    quantize(model, config, calib=calib, progress=False)
    copied = copy.deepcopy(model)  # its hooks must round with its own quantizers
    save_quantized(model, tmp_path / "q", tokenizer, config)
    again, _ = load_model(tmp_path / "q")
    test = _calib(family, seed=1)
    assert torch.equal(_out(again, test), _out(model, test))
    assert torch.equal(_out(copied, test), _out(model, test))
    scales = [float(b.module.s2d_residual.act_scale) for b in describe(again).blocks]
    assert all(s != 1.0 for s in scales)  # calibrated scales came back, not the placeholder


def test_residual_bits_errors():
    model, _ = tiny_model("llama")
    with pytest.raises(S2DError, match="residual stream's static scales"):
        quantize(copy.deepcopy(model), QuantConfig.from_scheme("W8A16", residual_bits=8, **STATIC), progress=False)
    with pytest.raises(S2DError, match="residual_bits"):
        QuantConfig.from_scheme("W8A8", residual_bits=1)
    with pytest.raises(S2DError, match="residual_bits are PTQ"):
        prepare_qat(copy.deepcopy(model), QuantConfig.from_scheme("W4A4", residual_bits=8))
    q = quantize(copy.deepcopy(model), QuantConfig.from_scheme("W8A16", residual_bits=8), progress=False)
    from s2d.quant.residual import quantize_residual

    with pytest.raises(S2DError, match="already quantizes"):
        quantize_residual(q, q.s2d_quant_config)
