"""Surgical rank search (SFSD): the smallest rank per Linear whose search metric stays within tolerance.

Linears are visited from the last block to the first (q, k, v, o, gate, up, down within a block). For each,
candidate ranks [1, 0.1κ … 0.9κ] are tried in ascending order. A probe measures the model on a search split
cut into chunks; the layer keeps the smallest rank at which every chunk has passed (for one chunk: the first
rank that passes; for several: the max over chunks of each chunk's first passing rank, SFSD's task rule).
If no candidate passes, the layer stays dense. With a keep target the walk stops once the model is that small.

Two probes: perplexity on wiki validation windows (accept if ppl ≤ ppl_ref · tolerance^(layers processed)) and
per-chunk accuracy (`AccuracyProbe`), whose scoring function the caller passes in (the task and image searches'
come from s2d.commands.search_probe, because lowrank does not depend on eval). Factors (eigenvectors and means for rom)
are computed once on the dense model and cut at every candidate rank. Because the walk runs backwards, blocks
before the current one are still dense, so each trial re-runs only the blocks from the current one on (their
inputs are cached).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
from tqdm.auto import tqdm

from s2d.arch import ModelDescription, capture_block_inputs, run_block
from s2d.errors import S2DError
from s2d.lowrank.budget import Layer, RankPlan, layers_of, model_parameters
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.factors import collect_factors
from s2d.lowrank.runner import forward_from, returns_tuple

log = logging.getLogger(__name__)


class Probe(Protocol):
    """What the walk asks of a search metric. `trial` measures the current model, re-running blocks ≥ block."""

    def reference(self) -> dict: ...

    def trial(self, block: int, processed: int) -> tuple[list[bool], dict]: ...

    def final(self, record: dict | None) -> dict: ...


def candidate_ranks(layer: Layer) -> list[int]:
    """[1, ⌊0.1κ⌋ … ⌊0.9κ⌋], ascending, without repeats, only ranks that save parameters."""
    ranks = sorted({1, *(math.floor(c / 10 * layer.kappa) for c in range(1, 10))})
    return [r for r in ranks if r >= 1 and layer.saves(r)]


def cached_block_inputs(desc: ModelDescription, batch) -> tuple[list[torch.Tensor], bool]:
    """The input of every block for `batch` on the current (dense) model, and whether blocks return tuples."""
    captured = capture_block_inputs(desc, batch)
    inputs = [captured.hidden]
    with torch.no_grad():
        for i in range(len(desc.blocks) - 1):
            inputs.append(run_block(desc, i, inputs[-1], captured.calls[i]))
    return inputs, returns_tuple(desc, 0, captured.hidden, captured.calls[0])


def search_windows(tokenizer, config: LowRankConfig) -> torch.Tensor:
    """The search split: consecutive seq_len windows from wiki *validation* (disjoint from train and test)."""
    from s2d.assets import wiki_tokens

    if tokenizer is None:
        raise S2DError("the perplexity search needs the model's tokenizer")
    ids = wiki_tokens(tokenizer, "validation")
    need = config.search_samples * config.seq_len
    if ids.numel() < need:
        raise S2DError(f"wiki validation has {ids.numel():,} tokens, fewer than search_samples × seq_len = {need:,}")
    return ids[:need].view(config.search_samples, config.seq_len)


class PplProbe:
    """Perplexity on wiki validation windows; one chunk; the limit tightens by `tolerance` per layer."""

    def __init__(self, desc: ModelDescription, config: LowRankConfig, tokenizer):
        self.desc, self.tolerance = desc, config.tolerance
        self.windows = search_windows(tokenizer, config)
        self.inputs, self.tuple_out = cached_block_inputs(desc, self.windows)
        self.ppl_ref = self._ppl(0)

    def _ppl(self, block: int) -> float:
        out = forward_from(self.desc, block, self.inputs[block], self.windows, self.tuple_out, labels=self.windows)
        return math.exp(float(out.loss))

    def reference(self) -> dict:
        return {"variant": "ppl", "split": "wiki validation", "search_tokens": int(self.windows.numel()),
                "ppl_ref": self.ppl_ref, "tolerance": self.tolerance}

    def trial(self, block: int, processed: int) -> tuple[list[bool], dict]:
        p, limit = self._ppl(block), self.ppl_ref * self.tolerance**processed
        return [p <= limit], {"ppl": p, "limit": limit}

    def final(self, record: dict | None) -> dict:
        return {"ppl_final": record["ppl"] if record else self.ppl_ref}


class AccuracyProbe:
    """Accuracy per chunk of a search split, against the dense model's; a chunk passes within `acc_tolerance`.

    The caller supplies the split as model-input batches (token ids, or a dict of pixel_values) and two
    functions: `score(i, logits)` turns batch i's logits into whatever it needs (e.g. option log-likelihoods),
    `accuracy(scores)` the per-batch scores into accuracy per chunk. Each batch's block inputs are cached, so a
    trial at block i re-runs only blocks i..
    """

    def __init__(self, desc: ModelDescription, batches: list[torch.Tensor], score, accuracy, acc_tolerance: float,
                 info: dict):
        self.desc, self.batches, self.score, self.accuracy = desc, batches, score, accuracy
        self.acc_tolerance, self.info = acc_tolerance, info
        self.cached = [cached_block_inputs(desc, ids) for ids in batches]
        self.acc_ref = self._accuracy(0)

    @torch.no_grad()
    def _accuracy(self, block: int) -> list[float]:
        scores = [self.score(i, forward_from(self.desc, block, inputs[block], ids, tuple_out).logits)
                  for i, (ids, (inputs, tuple_out)) in enumerate(zip(self.batches, self.cached, strict=True))]
        return self.accuracy(scores)

    def reference(self) -> dict:
        return {**self.info, "acc_ref": self.acc_ref, "acc_tolerance": self.acc_tolerance}

    def trial(self, block: int, processed: int) -> tuple[list[bool], dict]:
        acc = self._accuracy(block)
        return [a >= r - self.acc_tolerance for a, r in zip(acc, self.acc_ref, strict=True)], {"acc": acc}

    def final(self, record: dict | None) -> dict:
        return {"acc_final": record["acc"] if record else self.acc_ref}


def surgical_search(model, desc: ModelDescription, config: LowRankConfig, targets: list, batch, tokenizer,
                    progress: bool = True, probe: Probe | None = None) -> tuple[RankPlan, dict]:
    """Ranks by search; the model is left compressed at them. Returns the plan and the search record."""
    if probe is None:
        if config.search != "ppl":
            raise S2DError(f"the {config.search} search needs its probe: pass probe=s2d.commands.search_probe."
                           f"{config.search}_probe(...), or run `s2d compress --search {config.search}`")
        if desc.kind != "causal-lm":
            raise S2DError(f"the perplexity search needs a causal LM; this is a {desc.kind} model"
                           + (": use --search image" if desc.kind == "vision" else ""))
        probe = PplProbe(desc, config, tokenizer)
    layers = layers_of(desc.linears(), config.method)
    by_name = {layer.name: layer for layer in layers}
    candidates = {t.name: candidate_ranks(by_name[t.name]) for t in targets}
    candidates = {n: c for n, c in candidates.items() if c}
    factors = collect_factors(desc, {n: max(c) for n, c in candidates.items()}, config, batch, progress)

    total = model_parameters(model)
    target = math.floor(config.keep * total) if config.keep is not None else None
    reference = probe.reference()
    order = [lin for block in reversed(desc.blocks) for lin in block.linears if lin.name in candidates]
    ranks, trials, accepted, processed = {}, [], None, 0
    bar = tqdm(order, desc="search", unit="linear", disable=not progress)
    for lin in bar:
        processed += 1
        dense = model.get_submodule(lin.name)
        passed = None
        for r in candidates[lin.name]:
            model.set_submodule(lin.name, factors[lin.name].linear(r, dtype=dense.weight.dtype))
            oks, record = probe.trial(lin.block, processed)
            trials.append({"layer": lin.name, "rank": r, **record, "passed": oks})
            passed = oks if passed is None else [a or b for a, b in zip(passed, oks, strict=True)]
            if all(passed):
                ranks[lin.name], accepted = r, record
                break
        else:
            model.set_submodule(lin.name, dense)
        del factors[lin.name]  # each layer's factors are used once: free them as the walk goes
        bar.set_postfix(params=f"{model_parameters(model) / total:.3f}")
        if target is not None and model_parameters(model) <= target:
            break
    reached = target is None or model_parameters(model) <= target
    if not reached:
        log.warning("the search kept every layer it could within tolerance and stopped at %.1f%% of the "
                    "parameters, above keep=%s; a looser --tolerance (now %s) lets it compress more Linears",
                    100 * model_parameters(model) / total, config.keep, config.tolerance)
    plan = RankPlan(ranks, layers, total, blocks=sorted({by_name[n].block for n in ranks}))
    info = {**reference, **probe.final(accepted), "layers_processed": processed,
            "target_params": target, "target_reached": reached, "trials": trials}
    return plan, info
