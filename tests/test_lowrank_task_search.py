"""The task variant of the surgical rank search: disjoint splits, the per-chunk rule, cached-block scoring."""

import pytest

from s2d import load_model
from s2d.commands.search_probe import task_probe
from s2d.errors import S2DError
from s2d.eval import EvalConfig, build_task, evaluate, score_multiple_choice
from s2d.eval.tasks import split_task
from s2d.lowrank import LowRankConfig, compress
from s2d.lowrank.budget import model_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw):
    base = dict(method="rom", keep=None, search="task", search_task="polarity", search_fraction=0.2,
                search_chunks=3, acc_tolerance=0.05, n_samples=8, seq_len=32, chunk_size=4)
    return LowRankConfig(**{**base, **kw})


def test_split_is_disjoint_complete_spread_and_stable():
    task = build_task("analogy-mc")
    search, report = split_task(task, 0.2)
    assert len(search) + len(report) == len(task)
    assert set(search.examples).isdisjoint(report.examples)
    assert len(search) == pytest.approx(0.2 * len(task), abs=1)
    # evenly spaced: the first and the last fifth of the (section-ordered) task both contribute
    fifth = len(task) // 5
    assert set(task.examples[:fifth]) & set(search.examples) and set(task.examples[-fifth:]) & set(search.examples)
    assert split_task(build_task("analogy-mc"), 0.2) == (search, report)
    with pytest.raises(S2DError, match="fraction"):
        split_task(task, 1.0)


def test_probe_accuracy_from_cached_blocks_matches_a_plain_scoring():
    model, tok = load_model("tiny:llama")
    config = _config()
    probe = task_probe(model, tok, config, batch_size=7)
    examples = split_task(build_task("polarity"), 0.2)[0].examples
    for c in range(3):
        plain = score_multiple_choice(model, tok, examples[c::3], progress=False).acc
        assert probe.acc_ref[c] == pytest.approx(plain, abs=1e-12)
    for block in (1, 2):  # skipping the dense blocks before `block` changes nothing
        assert probe._accuracy(block) == probe.acc_ref


def test_task_search_keeps_the_max_over_chunks_of_the_first_passing_rank():
    model, tok = load_model("tiny:llama")
    config = _config()
    probe = task_probe(model, tok, config)
    report = compress(model, config, tokenizer=tok, probe=probe, progress=False)
    s = report.search
    assert s["variant"] == "task" and len(s["acc_ref"]) == 3
    trials = s["trials"]
    assert list(dict.fromkeys(t["layer"] for t in trials))[0] == "model.layers.2.self_attn.q_proj"
    assert report.ranks, "a 0.05 tolerance on a random tiny model should accept some ranks"
    for name in dict.fromkeys(t["layer"] for t in trials):
        tried = [t for t in trials if t["layer"] == name]
        cumulative = [any(t["passed"][c] for t in tried[: i + 1]) for i in range(len(tried)) for c in range(3)]
        done = [all(cumulative[3 * i: 3 * i + 3]) for i in range(len(tried))]
        if name in report.ranks:  # accepted at the first rank where every chunk has passed once
            assert done[-1] and not any(done[:-1]) and tried[-1]["rank"] == report.ranks[name]
        else:
            assert not any(done)
    for t in trials:
        assert t["passed"] == [a >= r - 0.05 for a, r in zip(t["acc"], s["acc_ref"], strict=True)]
    examples = split_task(build_task("polarity"), 0.2)[0].examples
    final = [score_multiple_choice(model, tok, examples[c::3], progress=False).acc for c in range(3)]
    assert final == pytest.approx(s["acc_final"], abs=1e-12)
    assert model_parameters(model) == report.summary["params_after"]


def test_report_split_leaves_the_search_examples_out():
    model, tok = load_model("tiny:llama")
    full = len(build_task("polarity"))
    res = evaluate(model, tok, EvalConfig(tasks=("polarity",), held_out={"polarity": 0.2}), progress=False)
    assert res["polarity"]["n"] == full - len(split_task(build_task("polarity"), 0.2)[0])
    assert "report split" in res["polarity"]["split"]
    limited = evaluate(model, tok, EvalConfig(tasks=("polarity",), held_out={"polarity": 0.2}, limit=10),
                       progress=False)
    assert limited["polarity"]["n"] == 10


def test_task_search_without_its_probe_says_how_to_get_one():
    model, tok = load_model("tiny:llama")
    with pytest.raises(S2DError, match="task_probe"):
        compress(model, _config(), tokenizer=tok, progress=False)


def test_cli_task_search_writes_the_report_split(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "s2d.cli", "compress", "tiny:llama", "--method", "svd", "--keep", "0.9",
                    "--search", "task", "--search-task", "polarity", "--acc-tolerance", "0.1", "--n-samples", "8",
                    "--seq-len", "32", "--eval", "polarity", "--no-model", "--out", str(out)], check=True,
                   capture_output=True)
    m = json.loads((out / "metrics.json").read_text())
    assert m["compression"]["search"]["variant"] == "task"
    assert "report split" in m["eval"]["polarity"]["split"]
    assert "acc per chunk" in (out / "report.md").read_text()
