"""Perplexity on the real SmolLM2 against plain exp(mean NLL) loops, over a few hundred held-out tokens."""

import math

import pytest
import torch

from s2d.assets import wiki_tokens
from s2d.eval import perplexity

pytestmark = pytest.mark.real


def _plain_nll(model, inputs, targets, first):
    """Per-token NLL of `targets`, predicted from position `first` on; float64 log-softmax, one window."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inputs])).logits[0].double(), -1)
    return [-logp[first + j, t].item() for j, t in enumerate(targets)]


def test_smollm2_perplexity_matches_plain_loops(smollm2):
    model, tok = smollm2
    ids = wiki_tokens(tok, "test")[:384].tolist()
    L = 128
    nll = []
    for i in range(len(ids) // L):  # windows: each window alone, its first token context only
        w = ids[i * L : (i + 1) * L]
        nll += _plain_nll(model, w, w[1:], 0)  # all L tokens in, as GPTQ does
    r = perplexity(model, ids, seq_len=L, batch_size=2, progress=False)
    assert r.n_tokens == len(nll) == 3 * 127
    assert r.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)

    ids = ids[:300]  # rolling: BOS in front, every token once, last window extended to the left
    nll = _plain_nll(model, [tok.bos_token_id] + ids[: L - 1], ids[:L], 0)
    nll += _plain_nll(model, ids[L - 1 : 2 * L - 1], ids[L : 2 * L], 0)
    nll += _plain_nll(model, ids[300 - L - 1 : 299], ids[2 * L :], L - (300 - 2 * L))
    r = perplexity(model, ids, seq_len=L, convention="rolling", prefix_token_id=tok.bos_token_id, progress=False)
    assert r.n_tokens == len(nll) == 300 and r.n_windows == 3
    assert r.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert 5 < r.ppl < 200  # a sane language model on English prose, not a broken one
