"""R2, the per-head rotation of values and of o_proj's input: function-preserving, and it does turn the heads."""

import copy

import pytest
import torch

from s2d.arch import describe
from s2d.assets.tiny import tiny_model
from s2d.errors import S2DError
from s2d.quant import QuantConfig, quantize
from s2d.quant.rotate import rotate_model


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _tokens():
    return torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # GQA in both; qwen2 has v biases (gemma3 cannot rotate R1)
def test_head_rotation_preserves_the_function_and_turns_the_heads(family):
    model, _ = tiny_model(family)
    x = _tokens()
    with torch.no_grad():
        ref = model(input_ids=x).logits
        plain = rotate_model(copy.deepcopy(model), seed=0)
        heads = rotate_model(copy.deepcopy(model), seed=0, heads=True)
        assert _rel(heads(input_ids=x).logits, ref) < 1e-4
    v_plain = describe(plain).blocks[0].linears
    v_heads = describe(heads).blocks[0].linears
    for a, b in zip(v_plain, v_heads, strict=True):
        changed = not torch.allclose(a.module.weight, b.module.weight)
        assert changed == (a.role in ("v", "o")), a.role  # only v's outputs and o's inputs are turned


def test_the_rotation_is_per_head_and_orthogonal():
    """o_proj's input, head by head: the same head_dim matrix M on every head (what makes GQA exact)."""
    model, _ = tiny_model("llama")
    before = model.model.layers[1].self_attn.o_proj.weight.detach().double().clone()
    rotate_model(model, seed=3, heads=True)
    # R1 turns o's outputs too; undo it by comparing Gram matrices of each head's column block, which R1 keeps
    after = model.model.layers[1].self_attn.o_proj.weight.detach().double()
    size = describe(model).head_dim
    for h in range(before.shape[1] // size):
        cols = slice(h * size, (h + 1) * size)
        assert not torch.allclose(after[:, cols], before[:, cols])
        # each head's block keeps its singular values: it is turned by orthogonal maps only (R1 rows, R2 columns)
        assert torch.allclose(torch.linalg.svdvals(after[:, cols]), torch.linalg.svdvals(before[:, cols]),
                              atol=1e-6)


def test_head_rotation_needs_the_residual_rotation():
    with pytest.raises(S2DError, match="rotate_heads"):
        QuantConfig.from_scheme("W4A4", rotate_heads=True)


def test_a_head_rotated_quantized_model_reloads_identically(tmp_path):
    from s2d import load_model
    from s2d.quant import save_quantized

    model, tok = load_model("tiny:qwen2")
    config = QuantConfig.from_scheme("W4A8", rotate=True, rotate_heads=True)
    quantize(model, config, progress=False)
    x = _tokens()
    with torch.no_grad():
        before = model(input_ids=x).logits
    save_quantized(model, tmp_path / "q", tok, config)
    again, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, before)
