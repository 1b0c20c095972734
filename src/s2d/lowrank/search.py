"""Surgical rank search (SFSD), perplexity variant.

Linears are visited from the last block to the first (q, k, v, o, gate, up, down within a block). For each,
candidate ranks [1, 0.1κ … 0.9κ] are tried in ascending order and the smallest with search perplexity
≤ ppl_ref · tolerance^(layers processed) is kept; if none passes the layer stays dense. With a keep target the
walk stops once the model is that small. Factors (eigenvectors and means for rom) are computed once on the
dense model and cut at every candidate rank. Because the walk runs backwards, blocks before the current one
are still dense, so each trial re-runs only the blocks from the current one on (their inputs are cached).
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from s2d.arch import ModelDescription, capture_block_inputs, run_block
from s2d.errors import S2DError
from s2d.lowrank.budget import Layer, RankPlan, layers_of, model_parameters
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.runner import forward_from, returns_tuple

log = logging.getLogger(__name__)


def candidate_ranks(layer: Layer) -> list[int]:
    """[1, ⌊0.1κ⌋ … ⌊0.9κ⌋], ascending, without repeats, only ranks that save parameters."""
    ranks = sorted({1, *(math.floor(c / 10 * layer.kappa) for c in range(1, 10))})
    return [r for r in ranks if r >= 1 and layer.saves(r)]


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


def surgical_search(model, desc: ModelDescription, config: LowRankConfig, targets: list, batch, tokenizer,
                    progress: bool = True) -> tuple[RankPlan, dict]:
    """Ranks by search; the model is left compressed at them. Returns the plan and the search record."""
    from s2d.lowrank.api import collect_factors

    if desc.kind != "causal-lm":
        raise S2DError(f"the perplexity search needs a causal LM; this is a {desc.kind} model")
    windows = search_windows(tokenizer, config)
    layers = layers_of(desc.linears(), config.method)
    by_name = {layer.name: layer for layer in layers}
    candidates = {t.name: candidate_ranks(by_name[t.name]) for t in targets}
    candidates = {n: c for n, c in candidates.items() if c}
    factors = collect_factors(desc, {n: max(c) for n, c in candidates.items()}, config, batch, progress)

    captured = capture_block_inputs(desc, windows)
    inputs = [captured.hidden]
    for i in range(len(desc.blocks) - 1):
        inputs.append(run_block(desc, i, inputs[-1], captured.calls[i]))
    tuple_out = returns_tuple(desc, 0, captured.hidden, captured.calls[0])

    def ppl(block: int) -> float:
        out = forward_from(desc, block, inputs[block], windows, tuple_out, labels=windows)
        return math.exp(float(out.loss))

    total = model_parameters(model)
    target = math.floor(config.keep * total) if config.keep is not None else None
    ppl_ref = ppl(0)
    order = [lin for block in reversed(desc.blocks) for lin in block.linears if lin.name in candidates]
    ranks, trials, current, processed = {}, [], ppl_ref, 0
    bar = tqdm(order, desc="search", unit="linear", disable=not progress)
    for lin in bar:
        processed += 1
        limit = ppl_ref * config.tolerance**processed
        dense = model.get_submodule(lin.name)
        for r in candidates[lin.name]:
            model.set_submodule(lin.name, factors[lin.name].linear(r, dtype=dense.weight.dtype))
            p = ppl(lin.block)
            trials.append({"layer": lin.name, "rank": r, "ppl": p, "limit": limit})
            if p <= limit:
                ranks[lin.name], current = r, p
                break
        else:
            model.set_submodule(lin.name, dense)
        del factors[lin.name]  # each layer's factors are used once: free them as the walk goes
        bar.set_postfix(ppl=f"{current:.2f}", params=f"{model_parameters(model) / total:.3f}")
        if target is not None and model_parameters(model) <= target:
            break
    reached = target is None or model_parameters(model) <= target
    if not reached:
        log.warning("the search kept every layer it could within tolerance and stopped at %.1f%% of the "
                    "parameters, above keep=%s", 100 * model_parameters(model) / total, config.keep)
    plan = RankPlan(ranks, layers, total, blocks=sorted({by_name[n].block for n in ranks}))
    info = {"variant": "ppl", "split": "wiki validation", "search_tokens": int(windows.numel()),
            "ppl_ref": ppl_ref, "ppl_final": current, "tolerance": config.tolerance,
            "layers_processed": processed, "target_params": target, "target_reached": reached, "trials": trials}
    return plan, info
