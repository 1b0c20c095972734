"""Learned rotations: Cayley steps stay orthogonal and descend, the rounding-in-the-turned-basis trick equals an
explicitly turned model, learning lowers the quantized loss, and the result is exact in FP and reloads."""

import copy

import pytest
import torch

from s2d.arch import describe
from s2d.assets.tiny import tiny_model
from s2d.errors import S2DError
from s2d.quant import QuantConfig, quantize
from s2d.quant.rotate import rotate_model, turn_head, turn_residual
from s2d.quant.spinquant import _dense, _round_in_turned_basis, _turns, cayley_step, learn_rotations


def _orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _tokens(rows=4, cols=24, seed=0):
    return torch.randint(0, 256, (rows, cols), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_cayley_steps_stay_orthogonal_and_descend():
    """Minimise ||U - T||² over orthogonal U (T orthogonal): the plain gradient is 2(U - T). A Cayley step never
    changes det U, so T is taken in the identity's component (det +1)."""
    target = _orthogonal(12, 1)
    target[:, 0] *= torch.sign(torch.linalg.det(target))
    u = torch.eye(12, dtype=torch.float64)
    start = float((u - target).norm())
    for _ in range(200):
        u = cayley_step(u, 2 * (u - target), lr=0.5)
    assert float((u @ u.t() - torch.eye(12, dtype=torch.float64)).abs().max()) < 1e-10
    assert float((u - target).norm()) < 0.05 * start


def _with_outlier(family):
    """A tiny model whose residual stream has one large channel, so 4-bit activations cost something."""
    model, _ = tiny_model(family)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 40
    return model


@pytest.mark.parametrize("heads", [False, True])
def test_rounding_in_the_turned_basis_equals_the_turned_model(heads):
    """The hooks compute q(x U) Uᵀ W: the same as turning the weights by U and rounding x U. Checked against a
    model turned for real (turn_residual/turn_head), then fake-quantized by the ordinary QuantLinears (W16A4)."""
    config = QuantConfig.from_scheme("W16A4", rotate=True, rotate_heads=heads, a_symmetric=False)
    base = rotate_model(_with_outlier("llama"), seed=0, heads=heads)
    desc = describe(base)
    u1 = torch.nn.Parameter(_orthogonal(64, 2).float())
    u2 = {b.index: torch.nn.Parameter(_orthogonal(desc.head_dim, 3 + b.index).float()) for b in desc.blocks} \
        if heads else {}
    x = _tokens()

    turned = copy.deepcopy(base)
    tdesc = describe(turned)
    turn_residual(tdesc, _dense(u1))
    for block in tdesc.blocks:
        if block.index in u2:
            turn_head(tdesc, block, _dense(u2[block.index]))
    from s2d.quant.api import convert
    convert(turned, config, progress=False)

    hooked = copy.deepcopy(base)
    hdesc = describe(hooked)
    undo = _round_in_turned_basis(hooked, hdesc, config, _turns(hdesc, u1, u2))
    with torch.no_grad():
        expected, got = turned(input_ids=x).logits, hooked(input_ids=x).logits
        plain = convert(copy.deepcopy(base), config, progress=False)(input_ids=x).logits
    assert _rel(got, expected) < 1e-4
    assert _rel(plain, expected) > 1e-3  # the turn changes the rounding: the check above is not vacuous
    for fn in undo:
        fn()
    with torch.no_grad():
        assert torch.allclose(hooked(input_ids=x).logits, base(input_ids=x).logits)  # hooks fully removed


@pytest.mark.parametrize("family,method", [("llama", "rtn"), ("qwen2", "gptq")])
def test_learning_lowers_the_quantized_loss_and_keeps_the_function(family, method):
    model = _with_outlier(family)
    x = _tokens(8, 32, seed=1)
    with torch.no_grad():
        reference = model(input_ids=x).logits
    config = QuantConfig.from_scheme("W4A4", rotate=True, rotate_heads=True, method=method, learn_rotation_steps=25,
                                     learn_rotation_batch=4, a_symmetric=False)
    rotate_model(model, seed=0, heads=True)
    history = learn_rotations(model, config, x, progress=False)
    assert history["orthogonality_error"] < 1e-5
    assert history["loss_after"] < history["loss_before"]
    assert history["distance_from_hadamard"] > 1e-3  # it moved
    assert len(history["loss"]) == 25
    with torch.no_grad():
        assert _rel(model(input_ids=x).logits, reference) < 1e-4  # folded exactly: FP function unchanged
    assert not any("parametrizations" in name for name, _ in model.named_modules())


def test_a_learned_rotation_reloads_identically(tmp_path):
    from s2d import load_model
    from s2d.quant import save_quantized

    model, tok = load_model("tiny:qwen2")
    calib = _tokens(4, 32, seed=2)
    config = QuantConfig.from_scheme("W4A4", rotate=True, rotate_heads=True, method="gptq", learn_rotation_steps=3,
                                     learn_rotation_batch=2)
    quantize(model, config, calib=calib, progress=False)
    assert model.s2d_rotation_history["steps"] == 3
    x = _tokens()
    with torch.no_grad():
        before = model(input_ids=x).logits
    save_quantized(model, tmp_path / "q", tok, config)
    again, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, before)


def test_bad_input_is_refused():
    with pytest.raises(S2DError, match="--rotate"):
        QuantConfig.from_scheme("W4A4", learn_rotation_steps=10)
    with pytest.raises(S2DError, match="learn_rotation"):
        QuantConfig.from_scheme("W4A4", rotate=True, learn_rotation_steps=-1)
    model, _ = tiny_model("llama")
    with pytest.raises(S2DError, match="calibration"):
        quantize(model, QuantConfig.from_scheme("W4A4", rotate=True, learn_rotation_steps=2), progress=False)
    with pytest.raises(S2DError, match="rotate"):  # an unrotated model has no folded norms to build on
        learn_rotations(tiny_model("llama")[0], QuantConfig.from_scheme("W4A4", rotate=True, learn_rotation_steps=2),
                        _tokens(), progress=False)
