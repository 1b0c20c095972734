"""Evaluation: perplexity against plain loops, multiple-choice scoring, task builders, classification, CLI."""

import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2d.assets import load_model
from s2d.errors import S2DError
from s2d.eval import MCExample, build_task, classification_accuracy, encode_pair, perplexity, score_multiple_choice
from s2d.eval.multiple_choice import choose, loglikelihood_tokens

# The package exports the function `perplexity`, which shadows the submodule of the same name.
ppl_module = importlib.import_module("s2d.eval.perplexity")

@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:llama")


@pytest.fixture(scope="module")
def wiki_ids(tiny):
    from s2d.assets import load_wiki

    _, tok = tiny
    text = load_wiki("test")[0].text[:1500]
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


# -- independent references: one window at a time, full float64 log-softmax, plain Python sums -------------


def _ref_windows(model, ids, L):
    nll = []
    with torch.no_grad():
        for i in range(len(ids) // L):
            w = ids[i * L : (i + 1) * L]
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nll += [-logp[p, w[p + 1]].item() for p in range(L - 1)]
    return math.exp(sum(nll) / len(nll)), len(nll)


def _ref_rolling(model, ids, L, bos):
    toks, nll = ids.tolist(), []
    with torch.no_grad():
        first = min(L, len(toks))
        logp = torch.log_softmax(model(torch.tensor([[bos] + toks[: first - 1]])).logits[0].double(), -1)
        nll += [-logp[p, toks[p]].item() for p in range(first)]
        done = first
        while done < len(toks):
            r = min(len(toks) - done, L)
            end = done + r
            logp = torch.log_softmax(model(torch.tensor([toks[end - L - 1 : end - 1]])).logits[0].double(), -1)
            nll += [-logp[L - r + j, toks[end - r + j]].item() for j in range(r)]
            done = end
    return math.exp(sum(nll) / len(nll)), len(nll)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_perplexity_matches_plain_loop(family, wiki_ids):
    model, _ = load_model(f"tiny:{family}")
    ref, n = _ref_windows(model, wiki_ids, 64)
    r = perplexity(model, wiki_ids, seq_len=64, progress=False)
    assert r.ppl == pytest.approx(ref, rel=1e-5)
    assert (r.n_tokens, r.n_windows, r.convention) == (n, len(wiki_ids) // 64, "windows")
    assert r.n_tokens == r.n_windows * 63 and r.nll_mean == pytest.approx(math.log(r.ppl))


def test_rolling_matches_plain_loop(tiny, wiki_ids):
    model, tok = tiny
    ref, n = _ref_rolling(model, wiki_ids, 64, tok.bos_token_id)
    r = perplexity(model, wiki_ids, seq_len=64, convention="rolling", progress=False)
    assert r.ppl == pytest.approx(ref, rel=1e-5)
    assert r.n_tokens == n == len(wiki_ids)  # every token scored exactly once


@pytest.mark.parametrize("convention", ["windows", "rolling"])
def test_batching_and_chunking_do_not_change_perplexity(tiny, wiki_ids, convention, monkeypatch):
    model, _ = tiny
    base = perplexity(model, wiki_ids, seq_len=48, batch_size=1, convention=convention, progress=False)
    for bs in (2, 5, None):
        r = perplexity(model, wiki_ids, seq_len=48, batch_size=bs, convention=convention, progress=False)
        assert r.ppl == pytest.approx(base.ppl, rel=1e-6) and r.n_tokens == base.n_tokens
    monkeypatch.setattr(ppl_module, "_CE_CHUNK", 7)
    r = perplexity(model, wiki_ids, seq_len=48, batch_size=3, convention=convention, progress=False)
    assert r.ppl == pytest.approx(base.ppl, rel=1e-6)


def test_window_size_does_not_matter_once_the_text_fits(tiny, wiki_ids):
    model, _ = tiny
    ids = wiki_ids[:100]
    results = [perplexity(model, ids, seq_len=L, convention="rolling", progress=False) for L in (100, 128, 300)]
    assert all(r.ppl == pytest.approx(results[0].ppl, rel=1e-6) and r.n_tokens == 100 for r in results)


def test_windows_are_scored_independently(tiny, wiki_ids):
    """Scoring the windows one call each and pooling the NLL gives the same perplexity as one call."""
    model, _ = tiny
    L = 40
    whole = perplexity(model, wiki_ids, seq_len=L, progress=False)
    parts = [perplexity(model, wiki_ids[i * L : (i + 1) * L], seq_len=L, progress=False)
             for i in range(whole.n_windows)]
    assert whole.nll_sum == pytest.approx(sum(p.nll_sum for p in parts), rel=1e-6)


class _Wrapped(nn.Module):
    """Not an nn.Linear: what a quantized or low-rank replacement looks like to the model."""

    def __init__(self, linear: nn.Linear, scale: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(linear.weight.detach().clone() * scale)
        self.b = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.w, self.b)


def _replace_linears(model, scale=1.0):
    from s2d.arch import describe

    for ref in describe(model).linears():
        parent, _, child = ref.name.rpartition(".")
        setattr(model.get_submodule(parent), child, _Wrapped(ref.module, scale))
    return model


def test_perplexity_runs_models_with_replaced_linears(wiki_ids):
    dense, _ = load_model("tiny:qwen2")
    base = perplexity(dense, wiki_ids, seq_len=64, progress=False)
    same = perplexity(_replace_linears(load_model("tiny:qwen2")[0]), wiki_ids, seq_len=64, progress=False)
    other = perplexity(_replace_linears(load_model("tiny:qwen2")[0], 3.0), wiki_ids, seq_len=64, progress=False)
    assert same.ppl == pytest.approx(base.ppl, rel=1e-5)
    assert abs(other.ppl - base.ppl) > 1e-3 * base.ppl  # the replacements are really what runs


def test_perplexity_bad_input(tiny, wiki_ids):
    model, _ = tiny
    with pytest.raises(S2DError, match="beyond the model's 512 positions"):
        perplexity(model, wiki_ids, seq_len=513, progress=False)
    with pytest.raises(S2DError, match="empty"):
        perplexity(model, torch.tensor([], dtype=torch.long), progress=False)
    with pytest.raises(S2DError, match="empty"):
        perplexity(model, [], progress=False)
    with pytest.raises(S2DError, match="not text"):
        perplexity(model, "some text", progress=False)
    with pytest.raises(S2DError, match="fewer than one window"):
        perplexity(model, wiki_ids[:10], seq_len=64, progress=False)
    with pytest.raises(S2DError, match="convention"):
        perplexity(model, wiki_ids, convention="sliding", progress=False)
    bert, _ = load_model("tiny:bert")
    with pytest.raises(S2DError, match="without a language-model head"):
        perplexity(bert, wiki_ids, progress=False)


# -- multiple choice ------------------------------------------------------------------------------------------


def test_acc_and_acc_norm_hand_computed():
    # Summed: option 0 wins (-2 > -3). Per character: -2/1 = -2 < -3/6 = -0.5, so option 1 wins.
    assert choose([-2.0, -3.0], ["x", "longer"]) == (0, 1)
    # Ties go to the first option, as numpy's argmax does.
    assert choose([-1.0, -1.0, -5.0], ["ab", "ab", "c"]) == (0, 0)


def test_score_multiple_choice_matches_plain_loop(tiny):
    model, tok = tiny
    examples = [MCExample("The capital of France is", ("Paris", "a dog", "blue"), 0),
                MCExample("Review: a dull , tedious film .\nSentiment:", ("negative", "positive"), 0),
                MCExample("One, two, three,", ("four", "seventeen"), 1)]
    result = score_multiple_choice(model, tok, examples, batch_size=3, progress=False)
    correct = correct_norm = 0
    for ex, lls in zip(examples, result.loglikelihoods, strict=True):
        ref = []
        for choice in ex.choices:  # unbatched, unpadded, float64 log-softmax over the whole string
            ctx = tok.encode(ex.context)
            whole = tok.encode(ex.context + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            ref.append(sum(logp[p - 1, whole[p]].item() for p in range(len(ctx), len(whole))))
        assert lls == pytest.approx(ref, abs=1e-4)
        correct += max(range(len(ref)), key=ref.__getitem__) == ex.label
        correct_norm += max(range(len(ref)), key=lambda i: ref[i] / len(ex.choices[i])) == ex.label
    assert result.acc == correct / 3 and result.acc_norm == correct_norm / 3 and result.n == 3


def test_encode_pair_moves_trailing_space_and_splits_the_whole_string(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "The cat ", "sat")
    assert ctx == tok.encode("The cat") and cont == tok.encode("The cat sat")[len(ctx):]
    assert encode_pair(tok, "", "x")[0] == [tok.bos_token_id]


def test_long_inputs_keep_their_last_tokens(tiny):
    model, _ = tiny
    ctx, cont = list(range(30, 230)), [65, 66, 67]
    short = loglikelihood_tokens(model, [(ctx, cont)], max_length=50)[0][0]
    manual = loglikelihood_tokens(model, [(ctx[-48:], cont)], max_length=512)[0][0]
    assert short == pytest.approx(manual, abs=1e-5)


def test_multiple_choice_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(S2DError, match="empty"):
        score_multiple_choice(model, tok, [], progress=False)
    with pytest.raises(S2DError, match="not an index"):
        score_multiple_choice(model, tok, [MCExample("a", ("b", "c"), 2)], progress=False)


# -- task builders --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks():
    return {name: build_task(name) for name in ("analogy-mc", "polarity", "wiki-cloze")}


def test_task_builders_are_deterministic_and_versioned(tasks):
    for name, task in tasks.items():
        again = build_task(name)
        assert again.examples == task.examples and task.version.startswith(name + "/")
        assert build_task(name, limit=7).examples == task.examples[:7]
        assert build_task(name, seed=1).examples != task.examples
        assert all(0 <= ex.label < len(ex.choices) and len(set(ex.choices)) == len(ex.choices)
                   for ex in task.examples)


def test_analogy_and_polarity_come_from_the_data(tasks):
    from s2d.assets import load_analogies, load_polarity

    answers = {(f"{a} is to {b} as {c} is to", d) for _, a, b, c, d in load_analogies()}
    analogy = tasks["analogy-mc"]
    assert len(analogy) == 1008 and all(len(ex.choices) == 4 for ex in analogy.examples)
    assert all((ex.context, ex.choices[ex.label]) in answers for ex in analogy.examples)
    labels = [ex.label for ex in analogy.examples]
    assert min(labels.count(i) for i in range(4)) > 150  # the answer's position is shuffled
    polarity = tasks["polarity"]
    rows = {(f"Review: {s}\nSentiment:", label) for s, label in load_polarity()}
    assert {(ex.context, ex.label) for ex in polarity.examples} == rows and len(polarity) == 200


def test_wiki_cloze_reads_only_the_test_split(monkeypatch):
    import s2d.assets as assets

    real, asked = assets.load_wiki, []

    def spy(split="train"):
        asked.append(split)
        return real(split)

    monkeypatch.setattr(assets, "load_wiki", spy)
    task = build_task("wiki-cloze")
    assert asked and set(asked) == {"test"}
    test_text = " ".join(" ".join(a.text.split()) for a in real("test"))
    train_titles = {a.title for a in real("train")}
    assert not train_titles & {a.title for a in real("test")}
    for ex in task.examples:
        assert ex.context in test_text  # every context is verbatim held-out text
        assert ex.context + " " + ex.choices[ex.label] + "." in test_text
        assert len(ex.choices) == 4


def test_unknown_task():
    with pytest.raises(S2DError, match="unknown task 'hellaswag'"):
        build_task("hellaswag")


# -- classification -------------------------------------------------------------------------------------------


def _plain_accuracy(model, batch):
    correct = 0
    with torch.no_grad():
        for i in range(len(batch["labels"])):
            one = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
            correct += int(model(**one).logits[0].argmax()) == int(batch["labels"][i])
    return correct / len(batch["labels"])


def test_classification_accuracy_sequence_and_image():
    from s2d.assets import load_polarity

    bert, tok = load_model("tiny:bert")
    rows = load_polarity()[::10]
    batch = dict(tok([s for s, _ in rows], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([label for _, label in rows])
    acc = classification_accuracy(bert, batch, batch_size=3)
    assert acc == pytest.approx(_plain_accuracy(bert, batch)) and 0.0 <= acc <= 1.0
    vit, _ = load_model("tiny:vit")
    gen = torch.Generator().manual_seed(0)
    images = {"pixel_values": torch.randn(24, 1, 28, 28, generator=gen), "labels": torch.arange(24) % 10}
    assert classification_accuracy(vit, images, batch_size=5) == pytest.approx(_plain_accuracy(vit, images))


def test_classification_bad_input(tiny):
    vit, _ = load_model("tiny:vit")
    with pytest.raises(S2DError, match="labels"):
        classification_accuracy(vit, {"pixel_values": torch.zeros(2, 1, 28, 28)})
    model, _ = tiny
    with pytest.raises(S2DError, match="classification"):
        classification_accuracy(model, {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2)})


# -- CLI ------------------------------------------------------------------------------------------------------


def test_cli_eval_writes_a_run_folder(tmp_path, capsys):
    from s2d.cli import main

    out = tmp_path / "run"
    assert main(["eval", "tiny:llama", "--tasks", "ppl:wiki,polarity", "--limit", "3", "--seq-len", "32,64",
                 "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.json", "report.md"}
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]
    assert metrics["polarity"]["n"] == 3 and metrics["polarity"]["version"] == "polarity/1"
    assert metrics["ppl:wiki@32"]["n_windows"] == 3 and metrics["ppl:wiki@32"]["n_tokens"] == 3 * 31
    assert metrics["ppl:wiki@64"]["n_tokens"] == 3 * 63
    assert "ppl:wiki@64" in (out / "report.md").read_text()
    assert main(["eval", "tiny:llama", "--tasks", "ppl:wiki,nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
