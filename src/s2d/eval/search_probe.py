"""The task-accuracy probe of the surgical rank search (SFSD's task variant), for `s2d.lowrank`.

A fraction (default 20%) of a zero-shot task is the search split, cut into chunks (default 3); the rest is
the report split, which `EvalConfig(held_out=...)` scores afterwards, so no reported figure saw the search.
A trial passes a chunk when its accuracy is at least the dense model's accuracy on that chunk minus
`acc_tolerance`. Every option of every search example is tokenized once, and the input of every block is
cached per batch, so a trial at block i re-runs only blocks i.. (the walk runs backwards).
"""

from __future__ import annotations

import torch

from s2d.arch import describe
from s2d.errors import S2DError
from s2d.eval.multiple_choice import choose, continuation_loglikelihood, mc_requests, padded_batches
from s2d.eval.perplexity import max_positions
from s2d.eval.tasks import build_task, split_task
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.runner import forward_from
from s2d.lowrank.search import cached_block_inputs


class TaskProbe:
    """Accuracy on `config.search_task`'s search split, per chunk, against the dense model's."""

    def __init__(self, model, tokenizer, config: LowRankConfig, batch_size: int = 32):
        if tokenizer is None:
            raise S2DError("the task search needs the model's tokenizer")
        self.desc, self.config = describe(model), config
        task = build_task(config.search_task, seed=config.seed)
        self.examples = split_task(task, config.search_fraction)[0].examples
        if len(self.examples) < config.search_chunks:
            raise S2DError(f"the search split of {task.name} has {len(self.examples)} examples, fewer than "
                           f"search_chunks={config.search_chunks}; raise search_fraction")
        requests, self.spans = mc_requests(tokenizer, self.examples)
        self.batches = padded_batches(requests, batch_size, max_positions(model) or 2048)
        self.n_requests = len(requests)
        self.cached = [cached_block_inputs(self.desc, ids) for _, ids, _ in self.batches]
        self.acc_ref = self._accuracy(0)

    @torch.no_grad()
    def _accuracy(self, block: int) -> list[float]:
        lls = [0.0] * self.n_requests
        for (idx, ids, rows), (inputs, tuple_out) in zip(self.batches, self.cached, strict=True):
            logits = forward_from(self.desc, block, inputs[block], ids, tuple_out).logits
            for row, (i, (inp, cont)) in enumerate(zip(idx, rows, strict=True)):
                lls[i] = continuation_loglikelihood(logits[row], inp, cont)[0]
        right = [choose(lls[lo: lo + k], ex.choices)[0] == ex.label
                 for ex, (lo, k) in zip(self.examples, self.spans, strict=True)]
        chunks = self.config.search_chunks
        return [sum(right[c::chunks]) / len(right[c::chunks]) for c in range(chunks)]

    def reference(self) -> dict:
        return {"variant": "task", "task": self.config.search_task, "split": f"{self.config.search_fraction:.0%} "
                f"search split in {self.config.search_chunks} chunks", "search_examples": len(self.examples),
                "acc_ref": self.acc_ref, "acc_tolerance": self.config.acc_tolerance}

    def trial(self, block: int, processed: int) -> tuple[list[bool], dict]:
        acc = self._accuracy(block)
        return [a >= r - self.config.acc_tolerance for a, r in zip(acc, self.acc_ref, strict=True)], {"acc": acc}

    def final(self, record: dict | None) -> dict:
        return {"acc_final": record["acc"] if record else self.acc_ref}
