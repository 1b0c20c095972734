"""The diagnose reading on post-norm models: the writer is the branch whose residual contribution makes the jump
(through its post-norm on Gemma3), blocks whose growing median hides their outliers, and labelled PCDR readings."""

import pytest
import torch

from s2d.arch import describe
from s2d.assets.tiny import tiny_model
from s2d.diagnose import DiagnoseConfig, collect, diagnose, reading

CHANNEL = 5
CONFIG = DiagnoseConfig(n_samples=4, seq_len=32, batch_size=2)


def _mlp(block):
    return next(b for b in block.branches if b.kind == "mlp")


def _plant(family: str, row_scale: float, post_gain: float | None = None, later_scale: float | None = None):
    """Make block 1's MLP branch write CHANNEL of the residual up to about 1e4 (through the post-feedforward norm's
    gain where there is one), and give block 0's q_proj a larger raw output that never reaches the residual."""
    model, tok = tiny_model(family)
    desc = describe(model)
    mlp = _mlp(desc.blocks[1])
    with torch.no_grad():
        mlp.writer.module.weight[CHANNEL] *= row_scale
        if post_gain is not None:
            desc.module(mlp.norm).weight[CHANNEL] = post_gain  # Gemma's RMSNorm scales by 1 + weight
        desc.blocks[0].linears[0].module.weight[0] *= 1e5
        if later_scale is not None:  # block 2's MLP writes large values into every channel: the median grows
            _mlp(desc.blocks[2]).writer.module.weight.mul_(later_scale)
    return model, tok, desc


def _old_rule(result: dict, first: int) -> str:
    """The previous reading: the largest output of any role up to the first massive block."""
    lins = [lin for lin in result["linears"] if lin["block"] <= first]
    return max([lin for lin in lins if lin["output"]["massive_count"] > 0] or lins,
               key=lambda lin: lin["output"]["max_abs"])["name"]


def _first(result: dict) -> int:
    return next(r["block"] for r in result["residual"] if r["massive_count"] > 0)


@pytest.fixture(scope="module")
def gemma3():
    model, tok, desc = _plant("gemma3", row_scale=100.0, post_gain=1250.0)
    return diagnose(model, tok, CONFIG, progress=False), desc


@pytest.fixture(scope="module")
def llama():
    model, tok, desc = _plant("llama", row_scale=1.5e6)
    return diagnose(model, tok, CONFIG, progress=False), desc


def test_the_adapter_describes_what_each_branch_adds_to_the_residual():
    gemma = describe(tiny_model("gemma3")[0]).blocks[1]
    assert [(b.kind, b.writer.name, b.norm) for b in gemma.branches] == [
        ("attn", "model.layers.1.self_attn.o_proj", "model.layers.1.post_attention_layernorm"),
        ("mlp", "model.layers.1.mlp.down_proj", "model.layers.1.post_feedforward_layernorm")]
    assert gemma.branches[1].module is gemma.module.post_feedforward_layernorm
    for family in ("llama", "qwen2", "bert", "vit"):  # BERT's post-LayerNorm normalizes the sum, not the branch
        block = describe(tiny_model(family)[0]).blocks[0]
        assert [b.kind for b in block.branches] == ["attn", "mlp"]
        assert all(b.norm is None and b.output == b.writer.name and b.module is b.writer.module
                   for b in block.branches)


def test_branch_contributions_equal_the_post_norm_outputs():
    model, _ = tiny_model("gemma3")
    desc = describe(model)
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append(output.detach().reshape(-1, output.shape[-1]).abs().amax(0))
        return hook

    branches = [b for block in desc.blocks for b in block.branches]
    hooks = [b.module.register_forward_hook(keep(b.output)) for b in branches]
    ids = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    result = collect(model, [{"input_ids": ids[i : i + 2], "use_cache": False} for i in (0, 2)], CONFIG,
                     progress=False)
    for h in hooks:
        h.remove()
    assert [(b["block"], b["branch"], b["norm"]) for b in result["branches"]] == [
        (b.writer.block, b.kind, b.norm) for b in branches]
    for entry, branch in zip(result["branches"], branches, strict=True):
        ref = torch.stack(seen[branch.output]).amax(0)
        assert torch.allclose(torch.tensor(entry["channel_absmax"]), ref)
        assert len(entry["writer_channel_absmax"]) == len(ref)


def test_gemma3_names_the_down_proj_through_its_post_feedforward_norm(gemma3):
    result, desc = gemma3
    first = _first(result)
    assert first == 1
    jump = result["residual"][1]["channel_absmax"][CHANNEL] - result["residual"][0]["channel_absmax"][CHANNEL]
    assert jump > 5e3
    q0 = desc.blocks[0].linears[0].name
    by_name = {lin["name"]: lin for lin in result["linears"]}
    assert by_name[q0]["output"]["max_abs"] > 10 * by_name["model.layers.1.mlp.down_proj"]["output"]["max_abs"]
    assert _old_rule(result, first) == q0  # what the reading used to name
    line = result["reading"][1]
    assert line.startswith("The Linear that writes it is model.layers.1.mlp.down_proj, through "
                           "model.layers.1.post_feedforward_layernorm (down, the MLP branch of block 1)")
    assert f"channel {CHANNEL}" in line and q0 not in line


def test_llama_names_the_down_proj_that_adds_to_the_residual(llama):
    result, desc = llama
    first = _first(result)
    assert first == 1
    q0 = desc.blocks[0].linears[0].name
    assert _old_rule(result, first) == q0
    line = result["reading"][1]
    assert line.startswith("The Linear that writes it is model.layers.1.mlp.down_proj (down, the MLP branch of "
                           "block 1): it adds up to")
    assert "through" not in line and q0 not in line
    assert all(b["norm"] is None and "writer_channel_absmax" not in b for b in result["branches"])


def test_a_grown_median_is_reported_when_a_large_block_has_no_massive_entries():
    model, tok, _ = _plant("llama", row_scale=1.5e6, later_scale=3e4)
    result = diagnose(model, tok, CONFIG, progress=False)
    r2 = result["residual"][2]
    assert r2["massive_count"] == 0 and r2["max_abs"] > 1e3 and r2["max_abs"] < 1000 * r2["median_abs"]
    note = next(line for line in result["reading"] if "0 massive" in line)
    assert note.startswith(f"Block 2: max|x| {r2['max_abs']:.3g} but 0 massive, the median is "
                           f"{r2['median_abs']:.3g}")
    assert "the 1000× rule does not fire" in note
    assert result["reading"][1].startswith("The Linear that writes it is model.layers.1.mlp.down_proj")


def test_no_grown_median_note_without_large_blocks(llama):
    result, _ = llama
    assert not any("0 massive" in line for line in result["reading"])
    plain, tok = tiny_model("llama")
    assert not any("0 massive" in line for line in diagnose(plain, tok, CONFIG, progress=False)["reading"])


def test_pcdr_readings_are_labelled(gemma3):
    result, _ = gemma3
    lin = next(lin for lin in result["linears"] if lin["name"] == "model.layers.1.mlp.down_proj")
    line = result["reading"][1]
    peak = ", ".join(f"PCDR{'₁₂₃'[k]} {v:.2f}" for k, v in enumerate(lin["pcdr_at_peak"]))
    assert f"PCDR at its largest-output token: {peak}; mean over tokens: PCDR₁ {lin['pcdr'][0]:.2f}, " \
           f"PCDR₃ {lin['pcdr'][2]:.2f}" in line
    largest = next(line for line in result["reading"] if line.startswith("Largest Linear outputs"))
    top = max(result["linears"], key=lambda lin: lin["output"]["max_abs"])
    assert (f"{top['name']} {top['output']['max_abs']:.3g} (σ₁ {top['sigma1']:.3g}, PCDR₁ mean over tokens "
            f"{top['pcdr'][0]:.2f}, at its largest-output token {top['pcdr_at_peak'][0]:.2f})") in largest
    assert "PCDR1" not in " ".join(result["reading"])


def test_a_result_without_branches_keeps_the_old_rule(gemma3):
    result, desc = gemma3
    old = {k: v for k, v in result.items() if k not in ("branches", "massive_rule")}
    line = reading(old)[1]
    assert line.startswith(f"The Linear that writes it is {_old_rule(result, 1)} ")
    assert "PCDR at its largest-output token" in line
