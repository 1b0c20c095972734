"""`compress(model, LowRankConfig, filter=None, calib=None)`: low-rank compression, in place, block by block.

`compress_folder` does the same from a safetensors folder on disk, one block in memory at a time.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from s2d.arch import ModelDescription, describe
from s2d.errors import S2DError
from s2d.lowrank.budget import RankPlan, layers_of, model_parameters, plan_keep, plan_ranks
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.factors import STATS, collect_factors, factors_for
from s2d.lowrank.io import FORMAT, VERSION, skeleton
from s2d.lowrank.runner import BlockRunner, DiskBlocks

log = logging.getLogger(__name__)


Filter = Callable[[nn.Module, str], bool]


@dataclass
class CompressionReport:
    """What a compression did: the plan's counts, the ranks chosen, time and memory."""

    method: str
    config: dict
    summary: dict
    ranks: dict[str, int]
    seconds: float
    peak_rss_mb: float
    calibration_tokens: int
    search: dict | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)  # every block Linear: [d_out, d_in, block]
    speed: dict | None = None  # with skip_slower: the Linears left dense and the timings that decided it

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration(tokenizer, config: LowRankConfig, model: nn.Module | None = None) -> torch.Tensor | dict:
    """`n_samples × seq_len` token windows from wiki train, seeded; too little text is an error. A vision model
    calibrates on `n_samples` seeded train images of the image set `config.calib` names."""
    from s2d.assets import IMAGE_SETS, calibration_batch, wiki_text, wiki_tokens

    vision = model is not None and describe(model).kind == "vision"
    if vision != (config.calib in IMAGE_SETS):
        raise S2DError(f"calibration set {config.calib!r} cannot feed this {'vision' if vision else 'text'} model: "
                       + (f"pass --calib {' or '.join(IMAGE_SETS)} (train images)" if vision else "use --calib wiki"))
    if vision:
        from s2d.assets import calibration_images

        return calibration_images(model, config.calib, config.n_samples, seed=config.seed)
    if config.calib != "wiki":
        raise S2DError(f"unknown calibration set {config.calib!r}: s2d ships 'wiki' (train split); or pass token "
                       "ids as calib=")
    if tokenizer is None:
        raise S2DError("calibration needs the model's tokenizer, or token ids passed as calib=")
    available, wanted = wiki_tokens(tokenizer, "train").numel(), config.n_samples * config.seq_len
    if available < wanted:
        raise S2DError(f"calibration text too short: wiki train has {available:,} tokens, fewer than n_samples × "
                       f"seq_len = {wanted:,}; ask for fewer samples or a shorter seq_len")
    return calibration_batch(tokenizer, wiki_text("train"), config.n_samples, config.seq_len, config.seed)


def _check_calib(calib) -> int:
    if isinstance(calib, dict):
        calib = next(iter(calib.values()), None)
    if not torch.is_tensor(calib) or calib.dim() < 2 or calib.shape[0] < 1 or calib.numel() == 0:
        raise S2DError("calib must be a non-empty batch (samples × tokens), or a dict of such tensors")
    return int(calib.shape[0] * calib.shape[1]) if calib.dim() == 2 else int(calib.shape[0])


def targets_of(desc: ModelDescription, filter: Filter | None = None) -> list:
    keep = filter or desc.is_target
    return [lin for lin in desc.linears() if keep(lin.module, lin.name)]


def plan_for(model: nn.Module, desc: ModelDescription, config: LowRankConfig, filter: Filter | None) -> RankPlan:
    layers = layers_of(desc.linears(), config.method)
    names = {lin.name for lin in targets_of(desc, filter)}
    targets = [layer for layer in layers if layer.name in names]
    if config.ranks is not None:
        return plan_ranks(layers, targets, model_parameters(model), config.ranks)
    return plan_keep(layers, targets, model_parameters(model), config.keep, config.schedule, config.rank_multiple)


def skip_slower(plan: RankPlan, config: LowRankConfig) -> tuple[RankPlan, dict | None]:
    """With `config.skip_slower`, drop from the plan every Linear whose factorized matmuls time slower than its
    dense one at `skip_slower_tokens` rows; it stays dense with all its parameters, so the plan's counts (and
    the report's fraction kept) are the real ones, above the budget's target when anything was dropped."""
    if not config.skip_slower or not plan.ranks:
        return plan, None
    from s2d.lowrank.speed import SpeedCheck

    check, by_name = SpeedCheck(config.skip_slower_tokens), {layer.name: layer for layer in plan.layers}
    skipped = {}
    for name, rank in plan.ranks.items():
        t = check.check(by_name[name].d_in, by_name[name].d_out, rank)
        if t.slower:
            skipped[name] = {"rank": rank, "dense_s": t.dense_s, "factorized_s": t.factorized_s}
    ranks = {n: r for n, r in plan.ranks.items() if n not in skipped}
    blocks = [b for b in plan.blocks if any(by_name[n].block == b for n in ranks)]
    kept = RankPlan(ranks, plan.layers, plan.model_params, plan.b, blocks, plan.kept_dense)
    if skipped:
        log.info("%d of %d Linears left dense: their factorized form times slower at %d token(s)", len(skipped),
                 len(plan.ranks), config.skip_slower_tokens)
    info = {"tokens": config.skip_slower_tokens, "skipped": skipped,
            "planned_fraction_kept": plan.summary()["fraction_kept"],
            "fraction_kept": kept.summary()["fraction_kept"],
            "timings": [t.to_dict() for t in check.timings.values()]}
    return kept, info


def decompose_blocks(desc: ModelDescription, ranks: dict[str, int], config: LowRankConfig, batch,
                     source: DiskBlocks | None = None, progress: bool = True) -> None:
    """Replace each named Linear by its FactorizedLinear at the planned rank, block by block. With
    `config.sequential`, each group of Linears sharing an input calibrates after the groups before it
    were replaced, and block i+1 sees the compressed block i; without it, all statistics are dense."""
    kind, model = STATS[config.method], desc.model
    by_block: dict[int, list[str]] = {}
    for lin in desc.linears():
        if lin.name in ranks:
            by_block.setdefault(lin.block, []).append(lin.name)
    last = max(by_block, default=-1)
    dense_stats = kind is not None and not config.sequential and bool(by_block)
    if dense_stats and source is not None:
        raise S2DError("from disk, compression is sequential (sequential=True)")
    factors = collect_factors(desc, ranks, config, batch, progress) if dense_stats else {}
    if source is not None:
        source.load_rest()
        source.load(0)
    runner = BlockRunner(desc, batch, config.chunk_size) if kind and by_block and not dense_stats else None
    n_blocks = len(desc.blocks) if source is not None else last + 1
    for i in tqdm(range(n_blocks), desc=config.method, unit="block", disable=not progress):
        if source is not None and i > 0:
            source.load(i)
        names = by_block.get(i, [])
        groups = runner.groups(i, names) if runner is not None and names else [names] if names else []
        for group in groups:
            stats = runner.collect(i, [group], kind) if runner is not None else {}
            for n in group:
                module = model.get_submodule(n)
                f = factors[n] if n in factors else factors_for(config.method, module, stats.get(n), config,
                                                                ranks[n], n)
                model.set_submodule(n, f.linear(ranks[n], dtype=module.weight.dtype))
        if runner is not None and i < last:
            runner.advance(i)
        if source is not None:
            source.release(i)


def _report(model_params_after: int, plan: RankPlan, config: LowRankConfig, t0: float, tokens: int,
            search: dict | None = None, speed: dict | None = None) -> CompressionReport:
    summary = plan.summary()
    if summary["params_after"] != model_params_after:
        raise RuntimeError(f"internal: the model has {model_params_after} parameters, the plan expected "
                           f"{summary['params_after']}")
    shapes = {layer.name: [layer.d_out, layer.d_in, layer.block] for layer in plan.layers}
    return CompressionReport(config.method, config.to_dict(), summary, dict(plan.ranks), time.perf_counter() - t0,
                             peak_rss_mb(), tokens, search, shapes, speed)


def _batch(config: LowRankConfig, calib, tokenizer, model: nn.Module | None = None) -> tuple[object, int]:
    if STATS[config.method] is None:
        return None, 0
    batch = calib if calib is not None else calibration(tokenizer, config, model)
    return batch, _check_calib(batch)


def compress(model: nn.Module, config: LowRankConfig, filter: Filter | None = None, calib=None,
             tokenizer=None, progress: bool = True, probe=None) -> CompressionReport:
    """Compress `model` in place: the Linears `filter(module, name)` selects (default: every block Linear)
    become FactorizedLinears. `calib` is a batch of token ids; without it, wiki train is drawn with
    `tokenizer`. With `config.search`, ranks come from the surgical search instead of the budget; the task
    search scores `probe` (s2d.commands.search_probe.task_probe, built on the dense model before this call)."""
    config.validate()
    t0 = time.perf_counter()
    desc = describe(model)
    if config.search:
        from s2d.lowrank.search import surgical_search

        batch, tokens = _batch(config, calib, tokenizer, model)
        plan, info = surgical_search(model, desc, config, targets_of(desc, filter), batch, tokenizer, progress,
                                     probe)
        _describe_in_config(model, config)
        return _report(model_parameters(model), plan, config, t0, tokens, info)
    plan, speed = skip_slower(plan_for(model, desc, config, filter), config)
    batch, tokens = _batch(config, calib, tokenizer, model) if plan.ranks else (None, 0)
    decompose_blocks(desc, plan.ranks, config, batch, progress=progress)
    _describe_in_config(model, config)
    return _report(model_parameters(model), plan, config, t0, tokens, speed=speed)


def _describe_in_config(model: nn.Module, config: LowRankConfig) -> None:
    """Record the factorized layers in the model's own config, so that any save_pretrained of it (a quantized
    copy, a fine-tune) writes the `low_rank` block that s2d.load_model needs to rebuild them."""
    from s2d.lowrank.io import factorized_layers, low_rank_block

    if getattr(model, "config", None) is not None and factorized_layers(model):
        model.config.low_rank = low_rank_block(model, config.method)


def compress_folder(folder: str | Path, config: LowRankConfig, out: str | Path, filter: Filter | None = None,
                    calib=None, tokenizer=None, progress: bool = True, *, hf_config, model_class) -> CompressionReport:
    """Compress the safetensors model in `folder` into `out`, reading and writing one block at a time.

    `hf_config` and `model_class` describe the folder's model (the caller reads them: lowrank loads no
    configs); calibration comes from `calib`, or from wiki text through `tokenizer`.
    """
    from s2d.io import atomic_dir

    config.validate()
    if config.search:
        raise S2DError("the surgical search evaluates the whole model; load it and use compress() instead")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise S2DError(f"{folder} is not a model folder: it has no config.json")
    t0 = time.perf_counter()
    raw_config = json.loads((folder / "config.json").read_text())
    if "low_rank" in raw_config:
        raise S2DError(f"{folder} is already low-rank; compress its dense original instead")
    model = skeleton(hf_config, model_class)
    model.tie_weights()
    desc = describe(model)
    if calib is None and tokenizer is None and STATS[config.method] and desc.kind != "vision":
        raise S2DError(f"{config.method} calibrates on data: pass calib (token ids) or the model's tokenizer")
    plan, speed = skip_slower(plan_for(model, desc, config, filter), config)
    batch, tokens = _batch(config, calib, tokenizer, model) if plan.ranks else (None, 0)
    by_name = {layer.name: layer for layer in plan.layers}
    source_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    with atomic_dir(out, needed=source_bytes) as tmp:
        source = DiskBlocks(folder, desc, tmp)
        decompose_blocks(desc, plan.ranks, config, batch, source=source, progress=progress)
        raw_config["low_rank"] = {"format": FORMAT, "version": VERSION, "method": config.method,
                                  "layers": {n: {"rank": r, "bias": by_name[n].factor_bias}
                                             for n, r in plan.ranks.items()}}
        source.finish(raw_config)
    return _report(model_parameters(model), plan, config, t0, tokens, speed=speed)
