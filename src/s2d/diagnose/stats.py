"""Streaming activation statistics: moments, a log-histogram for the median, channel absmax, massive entries.

Nothing here keeps an activation after its batch: every accumulator is O(channels + bins), so memory does not
grow with the number of calibration samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# log10|x| histogram: 0.01-decade bins from 1e-8 to 1e8; the median read from it is within ±1.2% (half a bin).
_LO, _HI, _BINS = -8.0, 8.0, 1600


@dataclass
class BatchSummary:
    """One tensor's contribution, computed once even when several Linears read the same tensor (q, k, v)."""

    n: int
    mean: float
    m2: float
    m3: float
    m4: float
    max_abs: float
    over: int
    big: int
    hist: torch.Tensor
    channel_absmax: torch.Tensor
    massive: list[tuple[float, int, int, int]]  # (|x|, sample, token, channel), |x| > massive_abs


def _sum64(t: torch.Tensor) -> float:
    # Row sums in float32 (torch sums them pairwise-cascaded: relative error ~1e-7 for these non-negative or
    # centred rows), then the few row sums in float64: 10× faster than a float64 cast of every entry.
    return float(t.sum(dim=-1).double().sum())


def log_bins(absx: torch.Tensor) -> torch.Tensor:
    """The log10|x| histogram of `absx`; the same bins as torch.histc over [_LO, _HI) (whose bin index is the
    same float32 expression scaled by 16, an exact power of two), at a third of its cost."""
    t = absx.float().clamp_min(1e-30)
    t = t.log10_().clamp_(_LO, _HI - 1e-6).sub_(_LO).mul_(_BINS / (_HI - _LO))
    return torch.bincount(t.to(torch.int32).clamp_(0, _BINS - 1).reshape(-1), minlength=_BINS).double()


def summarize(x: torch.Tensor, threshold: float, massive_abs: float, keep: int, sample0: int) -> BatchSummary:
    """Moments in float64 about the batch mean (merged exactly later), counts, and the massive candidates.

    `x` is (batch, tokens, channels) or (rows, channels); `sample0` is the index of its first sample.
    """
    x = x.detach()
    d = x.shape[-1]
    x3 = x.reshape(x.shape[0], -1, d) if x.dim() >= 3 else x.reshape(1, -1, d)
    rows = x3.reshape(-1, d).float()
    # The mean in float64 throughout: it can be far below mean |x|, where a float32 sum loses its digits.
    mean = rows.double().sum() / rows.numel()
    # Centred powers in float32, summed as above: as exact as an all-float64 pass to ~1e-7, at a tenth the cost.
    c = rows - mean.float()
    c2 = c * c
    absx = x3.abs()
    channel_absmax = absx.reshape(-1, d).amax(dim=0).float()
    max_abs = float(channel_absmax.max())  # the same value as absx.max(), without another pass
    massive = []
    big = (absx > massive_abs).nonzero() if max_abs > massive_abs else absx.new_zeros((0, 3), dtype=torch.long)
    if len(big):
        values = absx[big[:, 0], big[:, 1], big[:, 2]].float()
        top = values.topk(min(keep, len(values))).indices
        massive = [(float(values[i]), sample0 + int(big[i, 0]), int(big[i, 1]), int(big[i, 2])) for i in top]
    over = int(torch.count_nonzero(absx > threshold)) if max_abs > threshold else 0
    return BatchSummary(
        n=rows.numel(), mean=float(mean), m2=_sum64(c2), m3=_sum64(c2 * c), m4=_sum64(c2 * c2),
        max_abs=max_abs, over=over, big=len(big), hist=log_bins(absx),
        channel_absmax=channel_absmax, massive=massive)


@dataclass
class RunningStats:
    """Merges BatchSummaries with the pairwise update of Pébay (2008), exact in float64 for any split."""

    keep: int = 16
    massive_abs: float = 100.0
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    max_abs: float = 0.0
    over: int = 0
    big: int = 0
    hist: torch.Tensor | None = None
    channel_absmax: torch.Tensor | None = None
    massive: list = field(default_factory=list)

    def update(self, b: BatchSummary) -> None:
        na, nb = self.n, b.n
        n = na + nb
        delta = b.mean - self.mean
        d_n = delta / n
        m2 = self.m2 + b.m2 + delta * d_n * na * nb
        m3 = (self.m3 + b.m3 + delta * d_n * d_n * na * nb * (na - nb)
              + 3.0 * d_n * (na * b.m2 - nb * self.m2))
        m4 = (self.m4 + b.m4 + delta * d_n ** 3 * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * d_n * d_n * (na * na * b.m2 + nb * nb * self.m2) + 4.0 * d_n * (na * b.m3 - nb * self.m3))
        self.n, self.mean, self.m2, self.m3, self.m4 = n, self.mean + d_n * nb, m2, m3, m4
        self.max_abs = max(self.max_abs, b.max_abs)
        self.over += b.over
        self.big += b.big
        self.hist = b.hist.clone() if self.hist is None else self.hist + b.hist
        self.channel_absmax = (b.channel_absmax.clone() if self.channel_absmax is None
                               else torch.maximum(self.channel_absmax, b.channel_absmax))
        self.massive = sorted(self.massive + b.massive, reverse=True)[: self.keep]

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis E[(x−μ)⁴]/σ⁴ (3 for a Gaussian), over every entry."""
        return self.n * self.m4 / (self.m2 * self.m2) if self.m2 > 0 else float("nan")

    @property
    def median_abs(self) -> float:
        """Median |x| from the log-histogram: the geometric centre of the bin holding the middle entry."""
        if self.hist is None:
            return float("nan")
        idx = int(torch.searchsorted(self.hist.cumsum(0), torch.tensor(self.n / 2, dtype=torch.float64)))
        width = (_HI - _LO) / _BINS
        return 10 ** (_LO + (min(idx, _BINS - 1) + 0.5) * width)

    def _count_above(self, cut: float) -> int:
        """Entries above `cut`, at histogram resolution (used only when 1000× the median exceeds massive_abs)."""
        first = int((math.log10(cut) - _LO) / ((_HI - _LO) / _BINS)) + 1
        return int(self.hist[first:].sum()) if first < _BINS else 0

    def finish(self, top_channels: int, massive_ratio: float) -> dict:
        median = self.median_abs
        cut = massive_ratio * median
        absmax = self.channel_absmax
        top = absmax.topk(min(top_channels, len(absmax)))
        massive = [{"value": v, "sample": s, "token": t, "channel": c} for v, s, t, c in self.massive if v >= cut]
        count = self.big if cut <= self.massive_abs else self._count_above(cut)
        return {
            "n": self.n, "max_abs": self.max_abs, "mean": self.mean, "std": self.std, "kurtosis": self.kurtosis,
            "median_abs": median, "max_median_ratio": self.max_abs / median if median > 0 else float("inf"),
            "over_threshold": self.over, "over_threshold_fraction": self.over / self.n if self.n else 0.0,
            "top_channels": [{"channel": int(i), "absmax": float(v)}
                             for v, i in zip(top.values, top.indices, strict=True)],
            "massive_count": count, "massive": massive,
        }
