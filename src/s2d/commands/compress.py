"""`s2d compress`: compress a model, save it, evaluate it, and write the run folder."""

from __future__ import annotations

from pathlib import Path

from s2d.commands.load import load_model, source_of
from s2d.lowrank.api import CompressionReport, compress, compress_folder, peak_rss_mb
from s2d.lowrank.config import LowRankConfig
from s2d.report.lowrank import ranks_figure, report_markdown


def _is_folder(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.is_dir() and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


def run_compress(model_spec: str, config: LowRankConfig, out: str | Path, eval_tasks: tuple[str, ...] = (),
                 merge: bool = False, save_model: bool = True, eval_limit: int | None = None,
                 ppl_tokens: int = 16384, trust_remote_code: bool = False, mode: str = "new",
                 argv: list[str] | None = None) -> dict:
    """Compress `model_spec` and write config.yaml, metrics.json, report.md, figures/ranks.png and model/.

    A safetensors folder is compressed block by block from disk (bounded memory) unless a search needs the
    whole model; named models are compressed in memory.
    """
    from s2d.eval.suite import EvalConfig
    from s2d.runs import RunFolder

    config.validate()
    if eval_tasks:
        EvalConfig(tasks=tuple(eval_tasks), limit=eval_limit, ppl_tokens=ppl_tokens).validate()
    with RunFolder(out, "compress", {"model": str(model_spec), "lowrank": config.to_dict(),
                                     "eval": list(eval_tasks), "ppl_tokens": ppl_tokens, "merge": merge},
                   seed=config.seed, mode=mode, argv=argv) as run:
        return _compress_into(run, model_spec, config, eval_tasks, merge, save_model, eval_limit, ppl_tokens,
                              trust_remote_code)


def _compress_into(run, model_spec: str, config: LowRankConfig, eval_tasks: tuple[str, ...], merge: bool,
                   save_model: bool, eval_limit: int | None, ppl_tokens: int, trust_remote_code: bool) -> dict:
    from s2d.lowrank.io import save

    model_dir = run.path / "model"
    model = tokenizer = None
    if _is_folder(model_spec) and not config.search and not merge:
        report = _from_disk(model_spec, config, model_dir, trust_remote_code)
        if eval_tasks:
            model, tokenizer = load_model(model_dir)
    else:
        model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
        probe = None
        if config.search == "task":
            from s2d.commands.search_probe import task_probe

            probe = task_probe(model, tokenizer, config)
        elif config.search == "image":
            from s2d.commands.search_probe import image_probe

            probe = image_probe(model, config)
        report = compress(model, config, tokenizer=tokenizer, probe=probe)
        if save_model:
            save(model, model_dir, tokenizer, method=config.method, merge=merge)
    results = {}
    if eval_tasks:
        from s2d.eval.suite import EvalConfig, evaluate

        held_out = {config.search_task: config.search_fraction} if config.search == "task" else None
        results = evaluate(model, tokenizer, EvalConfig(tasks=tuple(eval_tasks), limit=eval_limit, seed=config.seed,
                                                        ppl_tokens=ppl_tokens, held_out=held_out))
    compression = report.to_dict()
    trials = (compression.get("search") or {}).pop("trials", None)
    if trials is not None:
        run.write_bytes("search_trials.json", _json(trials))
    metrics = {"model": str(model_spec), **source_of(model), "compression": compression, "eval": results,
               "peak_rss_mb_process": peak_rss_mb(),
               "units": {"seconds": "wall-clock seconds of the compression", "peak_rss_mb": "MiB (ru_maxrss)",
                         "macs": "multiply-accumulates per token in the block Linears"}}
    run.write_metrics(metrics)
    ranks_figure(report, run.figure_path("ranks.png"))
    command = run.command_line(f"compress {model_spec}")
    run.write_text("report.md", report_markdown(model_spec, report, results, command))
    return metrics


def _from_disk(folder: str, config: LowRankConfig, out: Path, trust_remote_code: bool) -> CompressionReport:
    """compress_folder, with a truncated or corrupt shard reported as the user's problem it is."""
    from safetensors import SafetensorError

    from s2d.assets.hf import check_weight_files, model_class, pretrained_config, pretrained_tokenizer
    from s2d.errors import S2DError
    from s2d.lowrank.factors import STATS

    hf_config = pretrained_config(Path(folder), trust_remote_code)
    check_weight_files(Path(folder))
    tokenizer = pretrained_tokenizer(Path(folder), trust_remote_code) if STATS[config.method] else None
    try:
        return compress_folder(folder, config, out, tokenizer=tokenizer, hf_config=hf_config,
                               model_class=model_class(hf_config))
    except (SafetensorError, OSError, EOFError) as err:
        raise S2DError(f"cannot read the weights in {folder}: {err}. The file may be truncated or corrupt: "
                       "re-create it (re-run the command that wrote it, or copy it again)") from err


def _json(obj) -> bytes:
    import json

    from s2d.io import nulled

    return (json.dumps(nulled(obj), indent=1, allow_nan=False) + "\n").encode()


