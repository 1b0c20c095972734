"""The block-by-block runner: cache block i's inputs, process block i, produce block i+1's inputs.

Inside a block, Linears are visited in execution order, in groups that share one input tensor (q, k, v;
gate, up). With `sequential`, a group is calibrated only after every earlier group has been replaced, so
each layer sees the outputs of the already-compressed layers upstream, as LLM-ROM requires.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from s2d.arch import ModelDescription, capture_block_inputs, model_inputs, run_block
from s2d.arch.finite import check_finite_tensors
from s2d.errors import S2DError
from s2d.lowrank.asvd import InputGram
from s2d.lowrank.io import read_tensors, tied_keys, weight_map
from s2d.lowrank.names import checkpoint_state, model_names
from s2d.lowrank.rom import GramOutputStats, OutputStats, input_covariance_root


class _Stop(Exception):
    """Raised by a hook once every Linear of interest has run, to skip the rest of the block."""


def split_batch(batch: torch.Tensor | dict, chunk_size: int) -> list:
    """The calibration batch in chunks of `chunk_size` sequences (bounds activation memory)."""
    if isinstance(batch, dict):
        n = next(iter(batch.values())).shape[0]
        return [{k: v[s:s + chunk_size] for k, v in batch.items()} for s in range(0, n, chunk_size)]
    return list(batch.split(chunk_size))


class BlockRunner:
    """Calibration activations entering the current block, one tensor per chunk of the batch."""

    def __init__(self, desc: ModelDescription, batch: torch.Tensor | dict, chunk_size: int = 32):
        self.desc = desc
        self.hidden, self.calls = [], []
        for chunk in split_batch(batch, chunk_size):
            captured = capture_block_inputs(desc, chunk)
            self.hidden.append(captured.hidden)
            self.calls.append(captured.calls)

    @torch.no_grad()
    def _run(self, index: int, chunks: Iterable[int], hooks: dict[nn.Module, Callable]) -> None:
        handles = [m.register_forward_hook(h) for m, h in hooks.items()]
        try:
            for c in chunks:
                try:
                    run_block(self.desc, index, self.hidden[c], self.calls[c][index])
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()

    def groups(self, index: int, names: list[str]) -> list[list[str]]:
        """`names` (Linears of block `index`) in execution order, grouped by the input tensor they share."""
        model, first = self.desc.model, {}

        def hook(name):
            def fn(module, args, output):
                first.setdefault(name, args[0])  # keeping the tensor alive makes the `is` test below sound
                if len(first) == len(names):
                    raise _Stop
            return fn

        self._run(index, [0], {model.get_submodule(n): hook(n) for n in names})
        missing = [n for n in names if n not in first]
        if missing:
            raise S2DError(f"{missing} never ran in block {index}; the model does not use these Linears")
        groups: list[list[str]] = []
        for name in first:  # dicts keep insertion order: execution order
            for group in groups:
                if first[group[0]] is first[name]:
                    group.append(name)
                    break
            else:
                groups.append([name])
        return groups

    def collect(self, index: int, groups: list[list[str]], kind: str) -> dict[str, InputGram | OutputStats]:
        """Streaming statistics of the groups' Linears over every chunk: "input" gives one XᵀX per group
        (its members share the input), "output" gives ΣYᵀY, ΣY, n per Linear (taken from the group's shared
        ΣXᵀX, ΣX where that square is the smaller one, as for gate and up)."""
        model = self.desc.model
        names = [n for g in groups for n in g]
        modules = {n: model.get_submodule(n) for n in names}
        grams: dict[str, InputGram] = {}  # group lead -> its input sums
        direct: dict[str, OutputStats] = {}
        for group in groups:
            d_in = modules[group[0]].in_features
            if kind == "input" or d_in**2 < sum(modules[n].out_features ** 2 for n in group):
                grams[group[0]] = InputGram(d_in)
            else:
                direct.update({n: OutputStats(modules[n].out_features) for n in group})
        seen: set[str] = set()

        def hook(name):
            def fn(module, args, output):
                if name in direct:
                    direct[name].update(output)
                elif name in grams:
                    grams[name].update(args[0])
                seen.add(name)
                if len(seen) == len(names):
                    raise _Stop
            return fn

        hooks = {modules[n]: hook(n) for n in names}
        for c in range(len(self.hidden)):
            seen.clear()
            self._run(index, [c], hooks)
        stats: dict[str, InputGram | OutputStats] = dict(direct)
        for group in groups:
            if group[0] in grams:
                gram = grams[group[0]]
                root = input_covariance_root(gram, group[0]) if kind == "output" and gram.n else None
                for n in group:
                    stats[n] = gram if kind == "input" else GramOutputStats(gram, modules[n].weight,
                                                                            modules[n].bias, root)
        return stats

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Replace the cached inputs of block `index` by its outputs (with whatever it now holds)."""
        self.hidden = [run_block(self.desc, index, h, calls[index])
                       for h, calls in zip(self.hidden, self.calls, strict=True)]


def returns_tuple(desc: ModelDescription, index: int, hidden: torch.Tensor, call) -> bool:
    """Whether block `index` returns a tuple (older layouts) or a bare tensor."""
    with torch.no_grad():
        return isinstance(desc.blocks[index].module(hidden, *call.args, **call.kwargs), tuple)


@torch.no_grad()
def forward_from(desc: ModelDescription, index: int, hidden: torch.Tensor, batch: torch.Tensor | dict,
                 out_is_tuple: bool, **kwargs):
    """The model's own forward (head included) with block `index` fed `hidden` and blocks before it skipped.

    Valid when `hidden` is what blocks 0..index-1 produce; it lets a search re-run only the blocks it changed.
    """
    blocks = [b.module for b in desc.blocks]

    def passthrough(hidden_states=None, *args, **kw):
        return (hidden_states,) if out_is_tuple else hidden_states

    def substitute(module, args, kw):
        if args:
            return (hidden, *args[1:]), kw
        return args, dict(kw, hidden_states=hidden)

    handle = blocks[index].register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        for i in range(index):
            blocks[i].forward = passthrough
        return desc.model(**model_inputs(desc, batch), **kwargs)
    finally:
        handle.remove()
        for i in range(index):
            blocks[i].__dict__.pop("forward", None)  # the class method is back


class DiskBlocks:
    """Block weights read from a safetensors folder one block at a time; each processed block is written to
    `out` and dropped back to the meta device, so peak memory follows one block plus the activations."""

    def __init__(self, folder: str | Path, desc: ModelDescription, out: Path):
        self.folder, self.desc, self.out = Path(folder), desc, Path(out)
        self.mapping = weight_map(self.folder)
        # Checkpoints keep the names of older transformers releases; the model is matched under its own names
        # and the output written under the checkpoint's, as from_pretrained and save_pretrained do.
        self.names = model_names(desc.model, self.mapping)
        self.prefixes = [b.name + "." for b in desc.blocks]
        self.written: dict[str, str] = {}

    def _block_keys(self, i: int) -> list[str]:
        return [k for k in self.names if k.startswith(self.prefixes[i])]

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of these model names, read under their checkpoint names."""
        state = read_tensors(self.folder, [self.names[k] for k in keys], self.mapping)
        return {k: state[self.names[k]] for k in keys}

    def _write(self, state: dict[str, torch.Tensor], name: str) -> None:
        """One output file, under the names save_pretrained writes (so the in-memory and disk folders agree)."""
        from safetensors.torch import save_file

        state = checkpoint_state(self.desc.model, state)
        save_file(state, self.out / name, metadata={"format": "pt"})
        self.written.update({k: name for k in state})

    def load_rest(self) -> None:
        """Embeddings, final norm, head: everything outside the blocks."""
        model = self.desc.model
        keys = [k for k in self.names if not any(k.startswith(p) for p in self.prefixes)]
        expected = {k for k in model.state_dict() if not any(k.startswith(p) for p in self.prefixes)}
        tied = tied_keys(model)
        missing = expected - set(keys) - tied
        if missing or set(keys) - expected:
            raise S2DError(f"the weights in {self.folder} do not match its config: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(set(keys) - expected)[:5]}")
        # An untied head is never run while compressing (the passes stop at the last block): it stays on the
        # meta device and is copied from the source at the end, which keeps its vocab×d matrix out of the peak.
        head = self.desc.head + "." if self.desc.head else None
        self.deferred = [k for k in keys if head and k.startswith(head) and k not in tied]
        loaded = [k for k in keys if k not in self.deferred]
        rest = self._read(loaded)
        check_finite_tensors(rest.items(), str(self.folder))
        model.load_state_dict(rest, strict=False, assign=True)
        model.tie_weights()
        self.rest = loaded

    def load(self, i: int) -> None:
        block, prefix = self.desc.blocks[i].module, self.prefixes[i]
        keys = self._block_keys(i)
        expected = {prefix + k for k in block.state_dict()}
        if set(keys) != expected:
            raise S2DError(f"block {i} in {self.folder} does not match the config: missing "
                           f"{sorted(expected - set(keys))[:5]}, unexpected {sorted(set(keys) - expected)[:5]}")
        state = self._read(keys)
        check_finite_tensors(state.items(), str(self.folder))
        block.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True, assign=True)

    def release(self, i: int) -> None:
        block, prefix = self.desc.blocks[i].module, self.prefixes[i]
        self._write({prefix + k: v.contiguous() for k, v in block.state_dict().items()}, f"block-{i:05d}.safetensors")
        block.to("meta")
        for lin in self.desc.blocks[i].linears:  # the description still references Linears replaced in the block
            lin.module.to("meta")

    def finish(self, config: dict) -> None:
        """Write the non-block tensors, the shard index, config.json and the folder's other files."""
        from s2d.io import atomic_write_json
        from s2d.lowrank.io import INDEX

        state = self.desc.model.state_dict()
        rest = {k: state[k].contiguous() for k in self.rest}
        rest.update(self._read(self.deferred))
        self._write(rest, "rest.safetensors")
        total = sum(f.stat().st_size for f in self.out.glob("*.safetensors"))
        atomic_write_json(self.out / INDEX, {"metadata": {"total_size": total}, "weight_map": self.written})
        for f in self.folder.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, "config.json", "s2d-cache.json"):
                shutil.copy2(f, self.out / f.name)
        atomic_write_json(self.out / "config.json", config)
