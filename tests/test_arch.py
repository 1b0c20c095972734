import pytest
import torch

from s2d.arch import block_outputs, capture_block_inputs, describe, run_block, summary
from s2d.assets.tiny import TINY_FAMILIES, tiny_model
from s2d.errors import S2DError

EXPECTED_ROLES = {
    "llama": {"q": 3, "k": 3, "v": 3, "o": 3, "gate": 3, "up": 3, "down": 3},
    "qwen2": {"q": 3, "k": 3, "v": 3, "o": 3, "gate": 3, "up": 3, "down": 3},
    "gemma3": {"q": 3, "k": 3, "v": 3, "o": 3, "gate": 3, "up": 3, "down": 3},
    "bert": {"q": 3, "k": 3, "v": 3, "o": 3, "fc1": 3, "fc2": 3},
    "mpnet": {"q": 3, "k": 3, "v": 3, "o": 3, "fc1": 3, "fc2": 3},
    "vit": {"q": 3, "k": 3, "v": 3, "o": 3, "fc1": 3, "fc2": 3},
}


def _batch(family: str, batch: int = 2, seq: int = 40) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if family == "vit":
        return torch.randn(batch, 1, 28, 28, generator=gen)
    return torch.randint(0, 256, (batch, seq), generator=gen)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_finds_linears_per_role(family):
    model, _ = tiny_model(family)
    desc = describe(model)
    assert desc.role_counts() == EXPECTED_ROLES[family]
    assert len(desc.blocks) == 3
    for lin in desc.linears():
        assert isinstance(lin.module, torch.nn.Linear)
        assert model.get_submodule(lin.name) is lin.module
        assert lin.shape == tuple(lin.module.weight.shape)
        assert desc.is_target(lin.module, lin.name)
    assert desc.embeddings and model.get_submodule(desc.embeddings) is not None
    assert not desc.is_target(model.get_submodule(desc.embeddings), desc.embeddings)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_block_runner_reproduces_hidden_states(family):
    """Chaining run_block from the cached block-0 input reproduces every block's own output."""
    model, _ = tiny_model(family)
    desc = describe(model)
    batch = _batch(family)
    reference = block_outputs(model, desc, batch)
    cached = capture_block_inputs(desc, batch)
    hidden = cached.hidden
    with torch.no_grad():
        for i in range(len(desc.blocks)):
            hidden = run_block(desc, i, hidden, cached.calls[i])
            torch.testing.assert_close(hidden, reference[i], rtol=1e-5, atol=1e-5)


def test_capture_leaves_model_intact():
    model, _ = tiny_model("llama")
    desc = describe(model)
    batch = _batch("llama")
    before = model(batch).logits
    capture_block_inputs(desc, batch)
    assert all("forward" not in vars(b.module) for b in desc.blocks)
    torch.testing.assert_close(model(batch).logits, before, rtol=0, atol=0)


def test_gemma3_blocks_get_their_own_masks():
    """Sliding and full attention blocks receive different masks; the runner must keep them apart."""
    model, _ = tiny_model("gemma3")
    desc = describe(model)
    cached = capture_block_inputs(desc, _batch("gemma3", seq=48))
    masks = [c.kwargs.get("attention_mask") for c in cached.calls]
    assert model.config.layer_types[0] != model.config.layer_types[1]
    assert masks[0] is not masks[1]


def test_unsupported_architecture_lists_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(S2DError, match="unsupported architecture.*llama.*bert.*vit"):
        describe(model)


def test_model_without_hf_config_is_rejected():
    with pytest.raises(S2DError, match="unsupported architecture"):
        describe(torch.nn.Linear(3, 3))


def test_summary_counts():
    model, _ = tiny_model("qwen2")
    info = summary(model)
    assert info["blocks"] == 3 and info["linears"] == 21
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["roles"]["k"]["shapes"] == {"32x64": 3}
    assert info["block_linear_parameters"] == sum(lin.module.weight.numel() for lin in describe(model).linears())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "vit"])
def test_fold_norm_gains_preserves_function(family):
    from s2d.arch import fold_norm_gains

    model, _ = tiny_model(family)
    with torch.no_grad():  # random gains and biases, so that folding has something to do
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    batch = _batch(family)
    before = model(batch).logits
    desc = describe(model)
    folded = fold_norm_gains(desc)
    assert len(folded) == 2 * len(desc.blocks)
    offset = desc.family.norm_gain_offset
    for name in folded:
        assert torch.all(desc.module(name).weight + offset == 1.0)
    torch.testing.assert_close(model(batch).logits, before, rtol=1e-5, atol=1e-5)


def test_fold_refuses_post_norm_family():
    from s2d.arch import fold_norm_gains

    with pytest.raises(S2DError, match="post-norms"):
        fold_norm_gains(describe(tiny_model("bert")[0]))
