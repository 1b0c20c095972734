"""Is a Linear's factorized form (x·Aᵀ then ·Bᵀ) faster than its dense form (x·Wᵀ) on this machine?

Rank r of an (m×n) matrix has fewer FLOPs iff r(m+n) < mn, but two thin matmuls pay twice the call overhead
and read x's result back from memory, so near κ (and at one token, where overhead dominates) they can lose.
The clock decides; the FLOP count is recorded beside it as a hint. Each distinct shape is timed once, on
torch's current thread count (set it as the deployment will).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from s2d.errors import S2DError

# (d_in, d_out, rank, tokens) -> (dense seconds, factorized seconds) per call
Timer = Callable[[int, int, int, int], tuple[float, float]]


@dataclass(frozen=True)
class ShapeTiming:
    """The median time of one dense and one factorized matmul for one shape, rank and token count."""

    d_in: int
    d_out: int
    rank: int
    tokens: int
    dense_s: float
    factorized_s: float

    @property
    def slower(self) -> bool:
        return self.factorized_s >= self.dense_s

    @property
    def fewer_flops(self) -> bool:
        return self.rank * (self.d_in + self.d_out) < self.d_in * self.d_out

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.dense_s / self.factorized_s if self.factorized_s > 0 else None,
                "fewer_flops": self.fewer_flops}


@torch.no_grad()
def time_matmuls(d_in: int, d_out: int, rank: int, tokens: int = 1, repeats: int = 9,
                 min_seconds: float = 5e-3) -> tuple[float, float]:
    """Median seconds per call of F.linear(x, W) and F.linear(F.linear(x, A), B) for x of `tokens` rows.

    The arms alternate each repeat (so drift on a shared machine hits both) and each sample loops enough calls
    to last `min_seconds`, well above the clock's resolution. Biases are left out: one add of d_out either way.
    """
    if min(d_in, d_out, rank, tokens, repeats) < 1:
        raise S2DError(f"shape, rank, tokens and repeats must be ≥ 1 (got {d_in}, {d_out}, {rank}, {tokens}, "
                       f"{repeats})")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, d_in, generator=gen)
    w = torch.randn(d_out, d_in, generator=gen)
    a, b = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
    arms = (lambda: F.linear(x, w), lambda: F.linear(F.linear(x, a), b))
    for fn in arms:  # warm-up: first calls allocate and pick kernels
        for _ in range(3):
            fn()
    number = 1
    while True:  # one loop count for both arms, set by the dense one
        t0 = time.perf_counter()
        for _ in range(number):
            arms[0]()
        if time.perf_counter() - t0 >= min_seconds or number >= 1 << 16:
            break
        number *= 2
    samples: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            for _ in range(number):
                arms[i]()
            samples[i].append((time.perf_counter() - t0) / number)
    return statistics.median(samples[0]), statistics.median(samples[1])


class SpeedCheck:
    """Times shapes at `tokens` rows on first sight and remembers them: `check(d_in, d_out, rank)`.

    `timer` defaults to this module's `time_matmuls`, looked up at call time (tests patch it).
    """

    def __init__(self, tokens: int = 1, timer: Timer | None = None):
        self.tokens, self.timer = tokens, timer
        self.timings: dict[tuple[int, int, int], ShapeTiming] = {}

    def check(self, d_in: int, d_out: int, rank: int) -> ShapeTiming:
        key = (d_in, d_out, rank)
        if key not in self.timings:
            timer = self.timer or time_matmuls
            dense_s, factorized_s = timer(d_in, d_out, rank, self.tokens)
            self.timings[key] = ShapeTiming(d_in, d_out, rank, self.tokens, float(dense_s), float(factorized_s))
        return self.timings[key]
