"""Streaming observers for static activation scales: a range calibrated once over a whole calibration batch.

The batch arrives in chunks (to bound memory), but the range must be the one the whole batch gives.
- minmax: the running extremes, exact.
- percentile and mse (per_tensor, the static case): a histogram of the values in fixed memory (HIST_BINS
  bins equal in log2|x|, each 0.54% wide relative to its values; see _Histogram). Each bin also keeps the sum and
  the sum of squares of its values, so the quantization error of a bin whose values round to one level is
  exact: Σ(x - q)² = Σx² - 2qΣx + nq². The percentile is located inside one bin (interpolated); MSE tries
  the same clips of the exact min-max range as `primitives._range_mse` (GPTQ's grid), each scored on the
  histogram, and keeps the one with the least error.
- other granularities (never static in QuantConfig) keep the per-chunk percentile or MSE range, averaged.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from s2d.errors import S2DError
from s2d.quant.primitives import QuantSpec, _fake_blocks, _qparams_from_range, observe_range, qparams_from_range

OCTAVES = 24  # powers of two below the running max|x| that get their own bins; smaller values share the lowest
STEPS = 128  # bins per octave, equal in log2|x|: a bin's edges differ by 2^(1/128), 0.54%, wherever they lie
HIST_BINS = 2 * OCTAVES * STEPS  # negative and positive values
_SLICE = 1 << 22  # values binned at a time: bounds the temporaries on a large chunk
_SHRINKS = torch.tensor([1.0 - i / 100 for i in range(80)], dtype=torch.float64)  # as primitives._range_mse


class _Histogram:
    """Count, sum and sum of squares of the values in bins equal in log2|x|, per sign.

    Bins are relative, not absolute: a heavy-tailed activation (a few values 100x the rest) keeps fine bins
    where its percentile lies, which equal-width bins over [-max, max] would not. Octaves are counted down from
    the running max; when a chunk raises it, the bins slide down and those that fall off merge into the lowest
    bin, whose sums stay exact (such tiny values round to 0 at any clip the search tries).
    """

    def __init__(self):
        self.top: int | None = None  # frexp exponent of the running max|x|: |x| < 2^top
        self.stats = torch.zeros(3, 2, OCTAVES * STEPS, dtype=torch.float64)  # (count, Σx, Σx²) x (−, +) x bin

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        if not x.numel():
            return
        amax = float(x.abs().max())
        if not math.isfinite(amax):
            raise S2DError("a calibration activation holds NaN or Inf, so no static scale can be chosen; check the "
                           "model in floating point (`s2d diagnose`) or calibrate on other data")
        if amax == 0:  # all zeros: bin 0 whatever the octaves turn out to be
            self.stats[0, 0, 0] += x.numel()
            return
        top = math.frexp(amax)[1]
        if self.top is None:
            self.top = top
        elif top > self.top:  # slide the bins down by the new octaves; the lowest merge into bin 0
            cut = min((top - self.top) * STEPS, OCTAVES * STEPS - 1)
            old, self.stats = self.stats, torch.zeros_like(self.stats)
            self.stats[..., 0] = old[..., : cut + 1].sum(-1)
            self.stats[..., 1 : OCTAVES * STEPS - cut] = old[..., cut + 1 :]
            self.top = top
        for part in x.split(_SLICE):
            # bin k of a sign holds |x| in [2^(top - OCTAVES + k/STEPS), ...); the tiny and zeros (log2 = -inf) 0
            index = (part.abs().log2_().sub_(self.top - OCTAVES).mul_(STEPS)).clamp_(0, OCTAVES * STEPS - 1).long()
            index += (part > 0).long() * (OCTAVES * STEPS)
            part = part.double()
            for row, weights in enumerate((None, part, part * part)):
                counts = torch.bincount(index, weights, minlength=HIST_BINS).double()
                self.stats[row] += counts.reshape(2, OCTAVES * STEPS)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(stats, lower edges, upper edges) of every bin in increasing order of value (0 holds the tiny ones)."""
        top = 0 if self.top is None else self.top  # None: only zeros were seen
        edges = torch.pow(2.0, top - OCTAVES + torch.arange(OCTAVES * STEPS + 1, dtype=torch.float64) / STEPS)
        lower, upper = edges[:-1].clone(), edges[1:]
        lower[0] = 0.0
        stats = torch.cat([self.stats[:, 0].flip(-1), self.stats[:, 1]], -1)
        return stats, torch.cat([-upper.flip(0), lower]), torch.cat([-lower.flip(0), upper])

    def quantile(self, rank: int) -> float:
        """The `rank`-th smallest value (1-based), interpolated linearly inside its bin."""
        stats, lower, upper = self.ordered()
        count = stats[0]
        cum = count.cumsum(0)
        i = int(torch.searchsorted(cum, torch.tensor(float(rank), dtype=torch.float64)).clamp(max=HIST_BINS - 1))
        inside = (rank - (float(cum[i - 1]) if i else 0.0)) / max(float(count[i]), 1.0)
        return float(lower[i] + inside * (upper[i] - lower[i]))

    def best_clip(self, lo: float, hi: float, spec: QuantSpec) -> float:
        """The shrink factor of [lo, hi] with the least squared quantization error over the histogram."""
        count, total, squares = self.ordered()[0]
        used = count > 0
        count, total, squares = count[used], total[used], squares[used]
        mean = total / count  # a bin's values round together, to the level of their mean: exact unless it straddles
        scale, zero = _qparams_from_range(_SHRINKS * lo, _SHRINKS * hi, spec)
        level = _fake_blocks(mean.expand(len(_SHRINKS), -1), scale, zero, spec)
        error = (squares - 2 * level * total + count * level * level).sum(-1)
        return float(_SHRINKS[int(error.argmin())])  # argmin takes the first minimum: the widest of equal clips


class RangeObserver:
    """One (lo, hi) per block over every calibration chunk (see the module docstring for each observer)."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self._extremes = dataclasses.replace(spec, observer="minmax", clip=1.0)  # the running min and max
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0
        self.histogram = _Histogram() if spec.observer != "minmax" and spec.granularity == "per_tensor" else None
        self._averaged: tuple[torch.Tensor, torch.Tensor] | None = None  # other granularities: running mean

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = observe_range(x, self._extremes)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        if self.histogram is not None:
            self.histogram.add(x)
        elif self.spec.observer != "minmax":
            lo, hi = observe_range(x, self.spec)
            n = self.batches
            self._averaged = (lo, hi) if n == 0 else ((self._averaged[0] * n + lo) / (n + 1),
                                                      (self._averaged[1] * n + hi) / (n + 1))
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated (lo, hi), clipped by the spec's clip ratio where the observer takes one."""
        if self.lo is None:
            raise S2DError("static activation scales need calibration data: pass calib=<token batch> to quantize()")
        spec, clip = self.spec, self.spec.clip
        if spec.observer == "minmax":
            lo, hi = self.lo, self.hi
        elif self.histogram is None:
            return self._averaged
        elif spec.observer == "percentile":
            n = int(self.histogram.stats[0].sum())
            k = min(n, max(1, math.ceil(spec.percentile / 100.0 * n)))  # nearest rank, as primitives' percentile
            lo_v, hi_v = self.histogram.quantile(n - k + 1), self.histogram.quantile(k)
            lo = torch.tensor(max(lo_v, float(self.lo)), dtype=self.lo.dtype).reshape(self.lo.shape)
            hi = torch.tensor(min(hi_v, float(self.hi)), dtype=self.hi.dtype).reshape(self.hi.shape)
        else:  # mse chooses its own clipping
            c = self.histogram.best_clip(float(self.lo), float(self.hi), spec)
            return self.lo * c, self.hi * c
        return (lo, hi) if clip == 1 else (lo * clip, hi * clip)

    def qparams(self):
        return qparams_from_range(*self.range(), self.spec)
