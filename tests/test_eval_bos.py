"""BOS in front of every perplexity window when the tokenizer prepends it (Gemma), against plain loops."""

import dataclasses
import json
import math

import pytest
import torch

from s2d.assets import load_wiki, wiki_tokens
from s2d.assets.tiny import byte_tokenizer, tiny_model
from s2d.cli import build_parser, eval_config
from s2d.errors import S2DError
from s2d.eval import EvalConfig, evaluate, perplexity
from s2d.eval.perplexity import resolve_bos, tokenizer_adds_bos

BOS = 256  # byte_tokenizer's <bos>
L = 64
PPL = EvalConfig(tasks=("ppl:wiki",), seq_lens=(L,), ppl_tokens=10 * L + 17)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")[0]


@pytest.fixture(scope="module")
def ids():
    text = load_wiki("test")[0].text[:1500]
    return torch.tensor(byte_tokenizer()(text, add_special_tokens=False)["input_ids"])


# -- independent references: one window per forward, float64 log-softmax, plain Python sums ----------------------


def _logp(model, seq):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)


def _ref_windows(model, ids, bos=None):
    """Non-overlapping windows of L tokens, each scoring its tokens 1..L-1; with `bos`, BOS goes in front."""
    toks, nll = ids.tolist(), []
    for i in range(len(toks) // L):
        w = toks[i * L : (i + 1) * L]
        seq = ([bos] if bos is not None else []) + w
        off = 1 if bos is not None else 0  # where w[0] sits in seq
        logp = _logp(model, seq)
        nll += [-logp[off + j - 1, w[j]].item() for j in range(1, L)]
    return math.exp(sum(nll) / len(nll)), len(nll)


def _ref_rolling_bos(model, ids, bos):
    """Every token once, in lm-eval's chunks [0, L), [L, 2L) ... (the last one's context reaching back L tokens
    from its end); token i is scored given BOS + the tokens from its window's context start up to i."""
    toks, nll, done = ids.tolist(), [], 0
    while done < len(toks):
        end = min(done + L, len(toks))
        start = max(0, end - L)
        logp = _logp(model, [bos] + toks[start:end])
        nll += [-logp[i - start, toks[i]].item() for i in range(done, end)]
        done = end
    return math.exp(sum(nll) / len(nll)), len(nll)


# -- the rule -------------------------------------------------------------------------------------------------


def test_the_rule_follows_what_the_tokenizer_encodes():
    plain, with_bos = byte_tokenizer(), byte_tokenizer(add_bos=True)
    assert with_bos("ab")["input_ids"] == [BOS, 64, 65] and plain("ab")["input_ids"] == [64, 65]
    assert (tokenizer_adds_bos(plain), tokenizer_adds_bos(with_bos)) == (False, True)
    assert [resolve_bos(rule, plain) for rule in ("auto", "always", "never")] == [False, True, False]
    assert [resolve_bos(rule, with_bos) for rule in ("auto", "always", "never")] == [True, True, False]
    with pytest.raises(S2DError, match="unknown BOS rule"):
        resolve_bos("sometimes", plain)


def test_a_tokenizer_without_a_bos_token_never_adds_one():
    class NoBos:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=True):
            raise AssertionError("not called: there is no BOS to look for")

    assert not tokenizer_adds_bos(NoBos())


# -- perplexity() with bos ----------------------------------------------------------------------------------------


def test_windows_with_bos_match_a_plain_loop_on_the_same_targets(model, ids):
    ref, n = _ref_windows(model, ids, bos=BOS)
    r = perplexity(model, ids, seq_len=L, bos=True, prefix_token_id=BOS, progress=False)
    assert r.ppl == pytest.approx(ref, rel=1e-5) and r.bos
    without = perplexity(model, ids, seq_len=L, progress=False)
    assert r.n_tokens == without.n_tokens == n == (len(ids) // L) * (L - 1)  # BOS is context, never a target
    assert (r.n_windows, r.n_input_tokens) == (without.n_windows, without.n_input_tokens)
    assert abs(math.log(r.ppl / without.ppl)) > 1e-3  # and it does change the context


def test_rolling_with_bos_matches_a_plain_loop(model, ids):
    ref, n = _ref_rolling_bos(model, ids, BOS)
    r = perplexity(model, ids, seq_len=L, convention="rolling", bos=True, prefix_token_id=BOS, progress=False)
    assert r.ppl == pytest.approx(ref, rel=1e-5) and r.n_tokens == n == len(ids)
    # A text that fits one window: lm-eval's rolling already puts BOS in front of it, so nothing changes.
    short = ids[: L - 5]
    a = perplexity(model, short, seq_len=L, convention="rolling", bos=True, prefix_token_id=BOS, progress=False)
    b = perplexity(model, short, seq_len=L, convention="rolling", prefix_token_id=BOS, progress=False)
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-6) and (a.bos, b.bos) == (True, False)


@pytest.mark.parametrize("convention", ["windows", "rolling"])
def test_bos_windows_never_exceed_seq_len_positions(model, ids, convention):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        perplexity(model, ids, seq_len=L, convention=convention, bos=True, prefix_token_id=BOS, batch_size=3,
                   progress=False)
    finally:
        handle.remove()
    assert max(seen) == L


@pytest.mark.parametrize("convention", ["windows", "rolling"])
def test_batching_does_not_change_bos_perplexity(model, ids, convention):
    runs = [perplexity(model, ids, seq_len=48, convention=convention, bos=True, prefix_token_id=BOS,
                       batch_size=bs, progress=False) for bs in (1, 4, None)]
    assert all(r.ppl == pytest.approx(runs[0].ppl, rel=1e-6) for r in runs)


def test_bos_falls_back_to_the_config_bos(model, ids):
    a = perplexity(model, ids, seq_len=L, bos=True, progress=False)  # tiny config: bos_token_id=256
    b = perplexity(model, ids, seq_len=L, bos=True, prefix_token_id=BOS, progress=False)
    assert a.ppl == b.ppl


# -- the suite, the flag and metrics.json -----------------------------------------------------------------------


def test_without_add_bos_nothing_changes(model):
    tok = byte_tokenizer()
    got = evaluate(model, tok, PPL, progress=False)[f"ppl:wiki@{L}"]
    ids = wiki_tokens(tok, "test")[: PPL.ppl_tokens]
    ref, n = _ref_windows(model, ids)
    assert got["bos"] is False and got["n_tokens"] == n
    assert got["ppl"] == pytest.approx(ref, rel=1e-5)
    assert got["ppl"] == perplexity(model, ids, seq_len=L, progress=False).ppl  # the call without bos, exactly


def test_auto_follows_the_tokenizer_and_the_flag_overrides_it(model):
    plain, with_bos = byte_tokenizer(), byte_tokenizer(add_bos=True)
    ids = wiki_tokens(plain, "test")[: PPL.ppl_tokens]
    ref_bos, _ = _ref_windows(model, ids, bos=BOS)
    ref_plain, _ = _ref_windows(model, ids)
    key = f"ppl:wiki@{L}"

    def run(tok, rule):
        r = evaluate(model, tok, dataclasses.replace(PPL, bos=rule), progress=False)[key]
        return r["bos"], r["ppl"]

    bos, ppl = run(with_bos, "auto")
    assert bos is True and ppl == pytest.approx(ref_bos, rel=1e-5)
    bos, ppl = run(with_bos, "never")
    assert bos is False and ppl == pytest.approx(ref_plain, rel=1e-5)
    bos, ppl = run(plain, "always")
    assert bos is True and ppl == pytest.approx(ref_bos, rel=1e-5)


def test_the_flag_reaches_the_config_and_bad_values_are_refused(capsys):
    parser = build_parser()
    assert eval_config(parser.parse_args(["eval", "m"])).bos == "auto"
    assert eval_config(parser.parse_args(["eval", "m", "--bos", "never"])).bos == "never"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "m", "--bos", "sometimes"])
    assert "--bos" in capsys.readouterr().err
    with pytest.raises(S2DError, match="unknown --bos"):
        dataclasses.replace(PPL, bos="yes").validate()
    assert EvalConfig.from_dict({k: v for k, v in PPL.to_dict().items() if k != "bos"}).bos == "auto"


def test_metrics_record_the_choice(tmp_path, monkeypatch, model):
    import s2d.commands.eval as command
    from s2d.cli import main

    monkeypatch.setattr(command, "load_model", lambda spec, **kw: (model, byte_tokenizer(add_bos=True)))
    common = ["--tasks", "ppl:wiki", "--seq-len", str(L), "--ppl-tokens", str(PPL.ppl_tokens)]
    for rule, expected in (("auto", True), ("never", False)):
        out = tmp_path / rule
        assert main(["eval", "tiny:llama", *common, "--bos", rule, "--out", str(out)]) == 0
        entry = json.loads((out / "metrics.json").read_text())["tasks"][f"ppl:wiki@{L}"]
        assert entry["bos"] is expected
        assert ("windows + BOS" in (out / "report.md").read_text()) is expected
