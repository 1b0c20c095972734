"""Token perplexity over windows of a token stream, in the GPTQ/QuaRot convention or lm-eval's rolling one.

Both conventions cut the stream into windows that are scored independently:
- "windows": non-overlapping windows of `seq_len` tokens; each window's first token is context only, so
  every window scores `seq_len - 1` tokens and the tail shorter than a window is left out (GPTQ, QuaRot).
- "rolling": lm-eval's `loglikelihood_rolling`: a prefix (BOS) token goes in front, every token is scored
  exactly once, windows hold `seq_len` inputs, and the last window is extended to the left.

BOS (`bos=True`, which s2d.eval.suite chooses when the tokenizer itself prepends BOS, as Gemma's does): every
window gets the BOS token in front as context. BOS is never a scored target, so the scored tokens are exactly
those without BOS. `seq_len` counts model positions with BOS included, as lm-eval's max_length does:
- "windows": a window still covers `seq_len` stream tokens and scores the same `seq_len - 1` targets; BOS is
  extra context before its first token and takes the position the last token (only ever a target) does not need.
- "rolling": every window looks like lm-eval's first one, BOS + `seq_len - 1` tokens scoring up to `seq_len`:
  the first window is unchanged, and a later window's first (context-only) input gives way to BOS.
Without BOS, "windows" is the GPTQ/QuaRot convention and "rolling" lm-eval's (prefix on the first window only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from s2d.errors import S2DError

CONVENTIONS = ("windows", "rolling")
BOS_RULES = ("auto", "always", "never")  # auto: BOS in front of every window iff the tokenizer prepends it
_BOS_PROBE = "Hello world"
# Positions per cross-entropy call: bounds the temporary log-softmax to ~100 MB at a 49k vocabulary.
_CE_CHUNK = 512
# Tokens per forward when batch_size is not given: large enough to amortize per-call overhead,
# small enough that the float32 logits of a 49k vocabulary stay around 400 MB.
_AUTO_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean NLL) over exactly `n_tokens` scored tokens in `n_windows` windows."""

    ppl: float
    nll_mean: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    seq_len: int
    convention: str
    n_input_tokens: int  # tokens given; in "windows" the tail and each window's first token are not scored
    bos: bool = False  # BOS in front of every window as context (never scored); see the module docstring

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Window:
    start: int  # offset into the stream: inputs are stream[start : start + length]
    length: int
    n_score: int  # the last n_score positions are scored (targets are the next tokens)


def check_causal_lm(model: nn.Module) -> None:
    """Raise S2DError unless `model` is a causal LM that s2d.arch supports (so it has an LM head)."""
    from s2d.arch import describe

    kind = describe(model).kind
    if kind != "causal-lm":
        article = "an" if kind[0] in "aeiou" else "a"
        raise S2DError(f"{type(model).__name__} is {article} {kind} model without a language-model head; "
                       "perplexity and log-likelihood tasks need a causal LM (e.g. smollm2-135m or tiny:llama)")


def max_positions(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise S2DError(f"seq_len must be an integer of at least 2, got {seq_len!r}")
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise S2DError(f"seq_len {seq_len} is beyond the model's {limit} positions "
                       f"(config.max_position_embeddings); use --seq-len {limit} or less")


def as_token_tensor(tokens) -> torch.Tensor:
    """A 1-D LongTensor of token ids from a tensor or a list; empty or non-integer input raises S2DError."""
    if isinstance(tokens, str):
        raise S2DError("perplexity takes token ids, not text: tokenize first, e.g. "
                       "tokenizer(text, add_special_tokens=False)['input_ids']")
    ids = torch.as_tensor(tokens)
    if ids.numel() == 0:
        raise S2DError("no tokens to score: the text is empty. Give at least one window of non-empty text")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise S2DError(f"token ids must be integers, got dtype {ids.dtype}")
    return ids.reshape(-1).long()


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` puts its BOS token in front, i.e. what lm-eval's default encoding would hold.

    Decided by encoding a probe string with and without special tokens rather than by `add_bos_token`: not
    every tokenizer class has that attribute or honours it, and a post-processor can prepend BOS without it.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = list(tokenizer(_BOS_PROBE)["input_ids"])
    plain = list(tokenizer(_BOS_PROBE, add_special_tokens=False)["input_ids"])
    return with_special[:1] == [bos] and plain[:1] != [bos]


def resolve_bos(rule: str, tokenizer) -> bool:
    """`bos` for perplexity() from a rule: "always", "never", or "auto" (follow the tokenizer)."""
    if rule not in BOS_RULES:
        raise S2DError(f"unknown BOS rule {rule!r}; use one of {', '.join(BOS_RULES)}")
    return rule == "always" or (rule == "auto" and tokenizer_adds_bos(tokenizer))


def _windows(n: int, seq_len: int, convention: str, bos: bool = False) -> list[_Window]:
    """Windows over the stream; with `bos`, a window's inputs are BOS + stream[start : start + length] and its
    targets stream[start : start + length + 1] (one position more than without BOS)."""
    if convention == "windows":
        n_windows = n // seq_len
        if n_windows == 0:
            raise S2DError(f"{n} tokens are fewer than one window of seq_len={seq_len}; give more text or a "
                           "shorter seq_len")
        # A window's last token is only a target, so it needs no forward position of its own: the
        # remaining seq_len - 1 inputs give the same logits under causal attention. With BOS in front the
        # forward is seq_len positions and the window scores the same seq_len - 1 targets.
        return [_Window(i * seq_len, seq_len - 1, seq_len - 1) for i in range(n_windows)]
    # "rolling": the stream is [prefix] + tokens, so stream position p predicts token p.
    first = min(seq_len, n)
    out, done = [_Window(0, first, first)], first
    while done < n:
        n_pred = min(n - done, seq_len)
        end = done + n_pred  # tokens [done, end) are scored by the window ending at stream position end
        out.append(_Window(end - seq_len, seq_len, n_pred))
        done = end
    if bos:  # the stream is the tokens alone and BOS is prepended: the same start, one stream input fewer
        out = [_Window(w.start, w.length - 1, w.n_score) for w in out]
    return out


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of `targets` under `logits` (M×V), in float32 chunks; returns a float64 scalar.

    cross_entropy fuses log-softmax and the gather, so no full-vocabulary log-prob tensor is kept
    and nothing is upcast to float64 before the reduction.
    """
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, logits.shape[0], _CE_CHUNK):
        chunk = logits[i : i + _CE_CHUNK].float()
        total += F.cross_entropy(chunk, targets[i : i + _CE_CHUNK], reduction="none").double().sum()
    return total


@torch.inference_mode()
def perplexity(model: nn.Module, tokens, seq_len: int = 128, batch_size: int | None = None,
               convention: str = "windows", prefix_token_id: int | None = None,
               progress: bool = True, bos: bool = False) -> PerplexityResult:
    """Perplexity of a causal LM on a token stream (see the module docstring for the two conventions).

    `prefix_token_id` is the BOS put in front under "rolling" (default: the config's bos, else eos token);
    with `bos=True` it goes in front of every window, in either convention, as context that is never scored.
    The model is simply called, so Linears replaced by quantized or low-rank modules are fine.
    """
    from tqdm.auto import tqdm

    if convention not in CONVENTIONS:
        raise S2DError(f"unknown perplexity convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    check_causal_lm(model)
    check_seq_len(model, seq_len)
    ids = as_token_tensor(tokens)
    if batch_size is not None and batch_size < 1:
        raise S2DError(f"batch_size must be at least 1, got {batch_size}")
    if convention == "rolling" or bos:
        if prefix_token_id is None:
            config = getattr(model, "config", None)
            prefix_token_id = getattr(config, "bos_token_id", None)
            if prefix_token_id is None:
                prefix_token_id = getattr(config, "eos_token_id", None)
            if isinstance(prefix_token_id, list):
                prefix_token_id = prefix_token_id[0]
        if prefix_token_id is None:
            raise S2DError(f"{'BOS' if bos else 'the rolling convention'} needs a prefix (BOS) token and the model "
                           "config names none; pass prefix_token_id=tokenizer.bos_token_id")
    if convention == "rolling" and not bos:
        stream = torch.cat([torch.tensor([prefix_token_id], dtype=torch.long), ids])
    else:
        stream = ids
    windows = _windows(ids.numel(), seq_len, convention, bos)
    per_batch = batch_size or max(1, _AUTO_BATCH_TOKENS // seq_len)
    device = next(model.parameters()).device
    # Equal-length windows batch without padding; only a short single window ever differs.
    groups: dict[int, list[_Window]] = {}
    for w in windows:
        groups.setdefault(w.length, []).append(w)
    batches = [g[i : i + per_batch] for g in groups.values() for i in range(0, len(g), per_batch)]

    nll_sum = torch.zeros((), dtype=torch.float64)
    n_scored = 0
    bar = tqdm(total=sum(w.n_score for w in windows), unit="tok", desc=f"perplexity@{seq_len}",
               disable=not progress, leave=False)
    for batch in batches:
        length = batch[0].length
        if bos:
            head = torch.full((len(batch), 1), prefix_token_id, dtype=torch.long)
            inputs = torch.cat([head, torch.stack([stream[w.start : w.start + length] for w in batch])], 1)
            targets = torch.stack([stream[w.start : w.start + length + 1] for w in batch])
            inputs, targets = inputs.to(device), targets.to(device)
        else:
            inputs = torch.stack([stream[w.start : w.start + length] for w in batch]).to(device)
            targets = torch.stack([stream[w.start + 1 : w.start + length + 1] for w in batch]).to(device)
        positions = inputs.shape[1]
        logits = model(input_ids=inputs, use_cache=False).logits
        if all(w.n_score == positions for w in batch):
            flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        else:
            flat_logits = torch.cat([logits[j, positions - w.n_score :] for j, w in enumerate(batch)])
            flat_targets = torch.cat([targets[j, positions - w.n_score :] for j, w in enumerate(batch)])
        nll_sum += _window_nll(flat_logits, flat_targets).cpu()
        n_batch = sum(w.n_score for w in batch)
        n_scored += n_batch
        bar.update(n_batch)
    bar.close()
    nll_mean = float(nll_sum) / n_scored
    return PerplexityResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, nll_sum=float(nll_sum), n_tokens=n_scored,
                            n_windows=len(windows), seq_len=seq_len, convention=convention,
                            n_input_tokens=ids.numel(), bos=bos)
