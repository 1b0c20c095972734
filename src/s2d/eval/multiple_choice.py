"""Zero-shot multiple choice by continuation log-likelihood, with lm-eval-harness's definitions.

Each option is scored as log P(" " + option | context). `acc` takes the option with the largest summed
log-likelihood; `acc_norm` divides it by the option's length in characters first (lm-eval's acc_norm).
Tokenization follows lm-eval's `_encode_pair`, so both give the same tokens and the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from s2d.errors import S2DError
from s2d.eval.perplexity import check_causal_lm, max_positions

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter between context and option


@dataclass(frozen=True)
class MCExample:
    """One question: a context, its options (without the leading space) and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    label: int


@dataclass
class MCResult:
    acc: float
    acc_norm: float
    n: int
    loglikelihoods: list[list[float]] = field(repr=False)  # [example][option], summed over tokens
    predictions: list[int] = field(repr=False)
    predictions_norm: list[int] = field(repr=False)

    def to_dict(self) -> dict:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


def _encode(tokenizer, text: str) -> list[int]:
    # lm-eval's HFLM.tok_encode calls tokenizer.encode with its default special-token handling.
    return list(tokenizer.encode(text))


def encode_pair(tokenizer, context: str, continuation: str, prefix_token_id: int | None = None):
    """(context ids, continuation ids) exactly as lm-eval encodes a causal-LM request.

    Trailing spaces of the context move to the continuation; the whole string is encoded once and split
    at the context's length, so the word boundary tokenizes as it would in running text.
    """
    if not context:
        prefix = tokenizer.bos_token_id if prefix_token_id is None else prefix_token_id
        if prefix is None:
            prefix = tokenizer.eos_token_id
        return [prefix], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def padded_batches(requests: Sequence[tuple[list[int], list[int]]], batch_size: int, max_length: int):
    """[(request indices, right-padded input ids, [(input, continuation)] per row)], longest first.

    Inputs longer than `max_length` keep their last tokens, as lm-eval does. Batches are right-padded without
    a mask: under causal attention, padding after a sequence cannot change the logits before it.
    """
    prepared = []
    for ctx, cont in requests:
        if not cont:
            raise S2DError("a continuation encodes to no tokens; every option must be non-empty text")
        inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        prepared.append((inp, list(cont)))
    # Longest first, as lm-eval does, so padding within a batch stays small.
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = torch.zeros(len(idx), len(prepared[idx[0]][0]), dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, : len(prepared[i][0])] = torch.tensor(prepared[i][0])
        out.append((idx, batch, [prepared[i] for i in idx]))
    return out


def continuation_loglikelihood(logits: torch.Tensor, inp: list[int], cont: list[int]) -> tuple[float, bool]:
    """(log P(cont | context), is_greedy) from one row of logits over `inp` = (context + cont)[:-1]."""
    cont_logits = logits[len(inp) - len(cont) : len(inp)].float()
    target = torch.tensor(cont, device=cont_logits.device)
    ll = -F.cross_entropy(cont_logits, target, reduction="sum").double()
    return float(ll), bool((cont_logits.argmax(-1) == target).all())


@torch.inference_mode()
def loglikelihood_tokens(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                         max_length: int | None = None, progress: bool = False) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) for token-id requests, lm-eval's `_loglikelihood_tokens`."""
    from tqdm.auto import tqdm

    check_causal_lm(model)
    batches = padded_batches(requests, batch_size, max_length or max_positions(model) or 2048)
    device = next(model.parameters()).device
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for idx, batch, rows in tqdm(batches, desc="loglikelihood", disable=not progress, leave=False):
        logits = model(input_ids=batch.to(device), use_cache=False).logits
        for row, (i, (inp, cont)) in enumerate(zip(idx, rows, strict=True)):
            results[i] = continuation_loglikelihood(logits[row], inp, cont)
    return results  # type: ignore[return-value]


def choose(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction): argmax of summed and of per-character log-likelihood.

    Ties go to the first option, as numpy's argmax does in lm-eval.
    """
    norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
    return max(range(len(lls)), key=lambda i: (lls[i], -i)), max(range(len(norm)), key=lambda i: (norm[i], -i))


def mc_requests(tokenizer, examples: Sequence[MCExample]) -> tuple[list, list[tuple[int, int]]]:
    """The token requests of every option of every example, and each example's (first request, count)."""
    requests, spans = [], []
    for ex in examples:
        if not 0 <= ex.label < len(ex.choices):
            raise S2DError(f"label {ex.label} is not an index into the {len(ex.choices)} options")
        spans.append((len(requests), len(ex.choices)))
        requests += [encode_pair(tokenizer, ex.context, TARGET_DELIMITER + c) for c in ex.choices]
    return requests, spans


def score_multiple_choice(model: nn.Module, tokenizer, examples: Sequence[MCExample], batch_size: int = 16,
                          max_length: int | None = None, progress: bool = True) -> MCResult:
    """acc and acc_norm of a causal LM on multiple-choice examples, zero-shot."""
    if not examples:
        raise S2DError("no examples to score: the task is empty (is --limit 0?)")
    if tokenizer is None:
        raise S2DError("multiple-choice scoring needs the model's tokenizer")
    requests, spans = mc_requests(tokenizer, examples)
    flat = loglikelihood_tokens(model, requests, batch_size=batch_size, max_length=max_length, progress=progress)
    lls, preds, preds_norm = [], [], []
    for ex, (lo, k) in zip(examples, spans, strict=True):
        ex_lls = [flat[j][0] for j in range(lo, lo + k)]
        pred, pred_norm = choose(ex_lls, ex.choices)
        lls.append(ex_lls)
        preds.append(pred)
        preds_norm.append(pred_norm)
    n = len(examples)
    acc = sum(p == ex.label for p, ex in zip(preds, examples, strict=True)) / n
    acc_norm = sum(p == ex.label for p, ex in zip(preds_norm, examples, strict=True)) / n
    return MCResult(acc, acc_norm, n, lls, preds, preds_norm)
