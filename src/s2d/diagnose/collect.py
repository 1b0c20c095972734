"""One calibration pass with forward hooks: statistics for every targeted Linear, every block's output, and what
each residual branch adds to the stream (its post-norm's output where the family has one)."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from s2d.arch import describe
from s2d.diagnose.config import DiagnoseConfig
from s2d.diagnose.spectra import PCDRAccumulator, weight_spectrum
from s2d.diagnose.stats import RunningStats, summarize
from s2d.errors import S2DError
from s2d.memory import return_large_allocations


def _tensor(out):
    return out[0] if isinstance(out, tuple) else out


class _Collector:
    """Hooks that fold each batch into streaming accumulators; a shared tensor is summarized once per batch."""

    def __init__(self, desc, config: DiagnoseConfig, n_batches: int, progress: bool):
        self.config = config
        self.sample0 = 0
        self.batch_index = 0
        self._recent: list[tuple[torch.Tensor, object]] = []
        self.linear_in: dict[str, RunningStats] = {}
        self.linear_out: dict[str, RunningStats] = {}
        self.residual: dict[int, RunningStats] = {}
        self.branch_out: dict[str, RunningStats] = {}  # post-norm outputs; a bare writer's is its linear_out
        self.spectra: dict[str, dict] = {}
        self.pcdr: dict[str, PCDRAccumulator] = {}
        rows_per_batch = math.ceil(config.pcdr_rows / n_batches)
        keep = dict(keep=config.keep_massive, massive_abs=config.massive_abs)
        for lin in tqdm(desc.linears(), desc="spectra", disable=not progress, leave=False):
            self.spectra[lin.name], factors = weight_spectrum(lin.weight, config.top_k, config.spectrum_keep,
                                                                     lin.name, config.spectra)
            self.pcdr[lin.name] = PCDRAccumulator(lin.weight, factors, config.pcdr_rows, rows_per_batch)
            self.linear_in[lin.name], self.linear_out[lin.name] = RunningStats(**keep), RunningStats(**keep)
        self.hooks = [lin.module.register_forward_hook(self._linear_hook(lin.name)) for lin in desc.linears()]
        for block in desc.blocks:
            self.residual[block.index] = RunningStats(**keep)
            self.hooks.append(block.module.register_forward_hook(self._block_hook(block.index, block.name)))
            for branch in block.branches:
                if branch.norm is not None:
                    self.branch_out[branch.norm] = RunningStats(**keep)
                    self.hooks.append(branch.module.register_forward_hook(self._branch_hook(branch.norm)))

    def _summary(self, x: torch.Tensor, where: str):
        # q, k and v (and gate and up) receive the same tensor object in turn; recognise it by identity among
        # the last few seen (a data_ptr could be reused by a later tensor once the first is freed).
        for seen, summary in self._recent:
            if seen is x:
                return summary
        c = self.config
        summary = summarize(x, c.threshold, c.massive_abs, c.keep_massive, self.sample0)
        if not math.isfinite(summary.max_abs):  # max|x| propagates NaN and Inf: no separate pass needed
            raise S2DError(f"non-finite activations (NaN or Inf) first appear at {where}, on calibration batch "
                           f"{self.batch_index}; the weights may be corrupt or the model overflows in this dtype "
                           "(try float32)")
        self._recent = [(x, summary)] + self._recent[:3]
        return summary

    def _linear_hook(self, name: str):
        def hook(module, args, output):
            x, y = args[0], _tensor(output)
            self.linear_in[name].update(self._summary(x, f"the input of {name}"))
            self.linear_out[name].update(self._summary(y, f"the output of {name}"))
            self.pcdr[name].update(x, y)
        return hook

    def _block_hook(self, index: int, name: str):
        def hook(module, args, output):
            self.residual[index].update(self._summary(_tensor(output), f"the output of block {index} ({name})"))
        return hook

    def _branch_hook(self, name: str):
        def hook(module, args, output):
            self.branch_out[name].update(self._summary(_tensor(output), f"the output of {name}"))
        return hook

    def branch_stats(self, branch) -> RunningStats:
        return self.branch_out[branch.norm] if branch.norm is not None else self.linear_out[branch.writer.name]

    def next_batch(self, size: int) -> None:
        self._recent = []
        self.sample0 += size
        self.batch_index += 1

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def collect(model, batches: list[dict], config: DiagnoseConfig, progress: bool = True) -> dict:
    """Spectra, PCDR and streaming statistics of `model` over `batches` (dicts of model inputs)."""
    desc = describe(model)
    if not desc.linears():
        raise S2DError(f"this {desc.family.name} model has no targeted Linears to diagnose")
    if not batches:
        raise S2DError("no calibration batches: give at least one sample (--n-samples 1 or more)")
    model.eval()
    return_large_allocations()  # batch-sized temporaries must not fragment the heap (RSS would grow with N)
    start = time.perf_counter()
    collector = _Collector(desc, config, len(batches), progress)
    spectra_seconds = time.perf_counter() - start
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            model(**batch)
            collector.next_batch(len(next(iter(batch.values()))))
    finally:
        collector.remove()
    c = config
    linears = []
    for lin in desc.linears():
        linears.append({
            "name": lin.name, "role": lin.role, "block": lin.block, "shape": list(lin.shape),
            "input": collector.linear_in[lin.name].finish(c.top_channels, c.massive_ratio),
            "output": collector.linear_out[lin.name].finish(c.top_channels, c.massive_ratio),
            **collector.spectra[lin.name], **collector.pcdr[lin.name].finish(),
        })
    residual = []
    for block in desc.blocks:
        stats = collector.residual[block.index]
        residual.append({"block": block.index, "name": block.name, **stats.finish(c.top_channels, c.massive_ratio),
                         "channel_absmax": stats.channel_absmax.tolist()})
    # What each branch adds to the residual, per channel (its post-norm's output, else its writer Linear's):
    # the reading names the branch whose contribution makes the massive channel jump.
    branches = []
    for block in desc.blocks:
        for branch in block.branches:
            stats = collector.branch_stats(branch)
            if stats.channel_absmax is None:  # the branch never ran (cannot happen in a full forward)
                continue
            entry = {"block": block.index, "branch": branch.kind, "writer": branch.writer.name,
                     "role": branch.writer.role, "norm": branch.norm, "max_abs": stats.max_abs,
                     "channel_absmax": stats.channel_absmax.tolist()}
            if branch.norm is not None:
                entry["writer_channel_absmax"] = collector.linear_out[branch.writer.name].channel_absmax.tolist()
            branches.append(entry)
    first = collector.residual[0]
    tokens = first.n // (collector.sample0 * len(first.channel_absmax))
    return {"family": desc.family.name, "kind": desc.kind, "n_blocks": len(desc.blocks),
            "samples": collector.sample0, "seq_len": tokens, "linears": linears, "residual": residual,
            "branches": branches, "massive_rule": {"abs": c.massive_abs, "ratio": c.massive_ratio},
            "seconds": {"spectra": spectra_seconds, "total": time.perf_counter() - start}}
