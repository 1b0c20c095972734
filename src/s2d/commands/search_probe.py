"""The task-accuracy probe of the surgical rank search (SFSD's task variant): eval's scoring, lowrank's walk.

A fraction (default 20%) of a zero-shot task is the search split, cut into chunks (default 3); the rest is
the report split, which `EvalConfig(held_out=...)` scores afterwards, so no reported figure saw the search.
Every option of every search example is tokenized once; s2d.lowrank.search.AccuracyProbe caches each batch's
block inputs and calls back here to turn logits into accuracy.
"""

from __future__ import annotations

from s2d.arch import describe
from s2d.errors import S2DError
from s2d.eval.multiple_choice import choose, continuation_loglikelihood, mc_requests, padded_batches
from s2d.eval.perplexity import max_positions
from s2d.eval.tasks import build_task, split_task
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.search import AccuracyProbe


def task_probe(model, tokenizer, config: LowRankConfig, batch_size: int = 32) -> AccuracyProbe:
    """Accuracy on `config.search_task`'s search split, per chunk, against the dense model's."""
    if tokenizer is None:
        raise S2DError("the task search needs the model's tokenizer")
    task = build_task(config.search_task, seed=config.seed)
    examples = split_task(task, config.search_fraction)[0].examples
    if len(examples) < config.search_chunks:
        raise S2DError(f"the search split of {task.name} has {len(examples)} examples, fewer than "
                       f"search_chunks={config.search_chunks}; raise search_fraction")
    requests, spans = mc_requests(tokenizer, examples)
    batches = padded_batches(requests, batch_size, max_positions(model) or 2048)

    def score(i: int, logits) -> list[tuple[int, float]]:
        idx, _, rows = batches[i]
        return [(j, continuation_loglikelihood(logits[row], inp, cont)[0])
                for row, (j, (inp, cont)) in enumerate(zip(idx, rows, strict=True))]

    def accuracy(scores: list[list[tuple[int, float]]]) -> list[float]:
        lls = [0.0] * len(requests)
        for batch in scores:
            for j, ll in batch:
                lls[j] = ll
        right = [choose(lls[lo: lo + k], ex.choices)[0] == ex.label
                 for ex, (lo, k) in zip(examples, spans, strict=True)]
        chunks = config.search_chunks
        return [sum(right[c::chunks]) / len(right[c::chunks]) for c in range(chunks)]

    info = {"variant": "task", "task": config.search_task, "split": f"{config.search_fraction:.0%} search split in "
            f"{config.search_chunks} chunks", "search_examples": len(examples)}
    return AccuracyProbe(describe(model), [ids for _, ids, _ in batches], score, accuracy, config.acc_tolerance, info)
