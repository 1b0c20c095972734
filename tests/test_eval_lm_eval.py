"""The lm-eval-harness bridge: s2d's scorer and lm-eval's agree on the same tasks, texts and in-memory model.

Skips only when lm_eval is not installed, and never under CI (CI=true), where its absence is a failure.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    import lm_eval  # noqa: F401
except ImportError:
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip("lm-eval is not installed: pip install -e '.[lm-eval]'", allow_module_level=True)

from s2d.arch import describe
from s2d.assets import load_model, load_wiki
from s2d.eval import build_task, perplexity, score_multiple_choice
from s2d.eval.lm_eval_bridge import evaluate_tasks, export_task, make_hflm, rolling_loglikelihood


class _Wrapped(nn.Module):
    """A stand-in for a quantized or low-rank replacement of a Linear (not an nn.Linear subclass)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.w = nn.Parameter(linear.weight.detach().clone() * 1.05)

    def forward(self, x):
        return F.linear(x, self.w)


@pytest.fixture(scope="module")
def transformed():
    """tiny:llama with every block Linear replaced and an untied, replaced lm_head."""
    model, tok = load_model("tiny:llama")
    for ref in describe(model).linears():
        parent, _, child = ref.name.rpartition(".")
        setattr(model.get_submodule(parent), child, _Wrapped(ref.module))
    gen = torch.Generator().manual_seed(1)
    head = nn.Linear(64, model.config.vocab_size, bias=False)
    head.weight.data = torch.randn(head.weight.shape, generator=gen) * 0.05
    model.lm_head = head
    return model, tok


def test_scorers_agree_on_every_task(transformed, tmp_path):
    model, tok = transformed
    tasks = [build_task(name, limit=12) for name in ("analogy-mc", "polarity", "wiki-cloze")]
    theirs = evaluate_tasks(model, tok, tasks, tmp_path, max_length=512, batch_size=8)
    for task in tasks:
        ours = score_multiple_choice(model, tok, task.examples, max_length=512, progress=False)
        other = theirs["s2d_" + task.name.replace("-", "_")]
        assert other["n"] == ours.n == 12
        assert (other["acc"], other["acc_norm"]) == (ours.acc, ours.acc_norm)
        for a, b in zip(ours.loglikelihoods, other["loglikelihoods"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_rolling_perplexity_agrees_with_lm_eval(transformed):
    model, tok = transformed
    text = load_wiki("test")[1].text[:1500]
    theirs = rolling_loglikelihood(model, tok, [text], max_length=128)[0]
    ours = perplexity(model, tok(text, add_special_tokens=False)["input_ids"], seq_len=128, convention="rolling",
                      prefix_token_id=tok.bos_token_id, progress=False)
    assert ours.n_tokens == 1500  # byte-level: one token per character
    assert -ours.nll_sum == pytest.approx(theirs, abs=1e-4 * ours.n_tokens, rel=1e-6)


def test_lm_eval_rolling_scores_the_tokenizers_own_bos(transformed):
    """With a tokenizer that prepends BOS (Gemma), lm-eval 0.4's rolling puts its prefix before the encoded
    [BOS] + text, so it scores the BOS after BOS as one more target, and no later window has BOS. s2d's BOS
    rule scores only the text's tokens, with BOS before every window; this pins what lm-eval does."""
    from s2d.assets.tiny import byte_tokenizer

    model, _ = transformed
    tok = byte_tokenizer(add_bos=True)
    text = load_wiki("test")[1].text[:300]
    theirs = rolling_loglikelihood(model, tok, [text], max_length=128)[0]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    same = perplexity(model, ids, seq_len=128, convention="rolling", prefix_token_id=tok.bos_token_id,
                      progress=False)
    assert same.n_tokens == 301 and -same.nll_sum == pytest.approx(theirs, abs=1e-4 * 301, rel=1e-6)


def test_wrapping_leaves_a_replaced_head_untied(transformed):
    model, tok = transformed
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings and head is not embed
    make_hflm(model, tok, max_length=64)
    assert model.lm_head.weight is head and not torch.equal(head, embed)
    assert "tie_weights" not in vars(model)  # the guard is removed again
    clone, _ = load_model("tiny:llama")  # without the guard, tie_weights does re-tie a replaced head
    clone.lm_head = nn.Linear(64, clone.config.vocab_size, bias=False)
    clone.tie_weights()
    assert clone.lm_head.weight is clone.model.embed_tokens.weight


def test_exported_task_runs_from_any_working_directory(tmp_path, monkeypatch):
    task = build_task("polarity", limit=3)
    name, yaml_path = export_task(task, tmp_path / "tasks")
    config = json.loads(yaml_path.read_text())
    data = config["dataset_kwargs"]["data_files"]["test"]
    assert os.path.isabs(data) and name == "s2d_polarity"
    rows = [json.loads(line) for line in open(data)]
    assert [(r["context"], tuple(r["choices"]), r["label"]) for r in rows] == \
        [(ex.context, ex.choices, ex.label) for ex in task.examples]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, tok = load_model("tiny:llama")
    out = evaluate_tasks(model, tok, [task], tmp_path / "tasks", max_length=256)
    assert out["s2d_polarity"]["n"] == 3
