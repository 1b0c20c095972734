"""`s2d compress`: compress a model, save it, evaluate it, and write the run folder."""

from __future__ import annotations

import sys
from pathlib import Path

from s2d.lowrank.api import CompressionReport, compress, compress_folder, peak_rss_mb
from s2d.lowrank.config import LowRankConfig


def ranks_figure(report: CompressionReport, path: Path) -> Path:
    """Rank kept per Linear as a fraction of min(d_in, d_out), in model order, coloured by role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.shapes)
    roles = [n.rsplit(".", 1)[-1] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) / 20), 3.2))
    for role in dict.fromkeys(roles):
        xs = [i for i, r in enumerate(roles) if r == role]
        ys = [report.ranks.get(names[i], min(report.shapes[names[i]][:2])) / min(report.shapes[names[i]][:2])
              for i in xs]
        ax.scatter(xs, ys, s=8, label=role)
    ax.set_xlabel("Linear (model order, block by block)")
    ax.set_ylabel("rank / min(d_in, d_out)  (1 = dense)")
    ax.set_title(f"{report.method}: {report.summary['fraction_kept']:.1%} of parameters kept")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=min(7, len(set(roles))), loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _is_folder(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.is_dir() and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


def run_compress(model_spec: str, config: LowRankConfig, out: str | Path, eval_tasks: tuple[str, ...] = (),
                 merge: bool = False, save_model: bool = True, eval_limit: int | None = None,
                 ppl_tokens: int = 16384, trust_remote_code: bool = False, mode: str = "new") -> dict:
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
                   seed=config.seed, mode=mode) as run:
        return _compress_into(run, model_spec, config, eval_tasks, merge, save_model, eval_limit, ppl_tokens,
                              trust_remote_code)


def _compress_into(run, model_spec: str, config: LowRankConfig, eval_tasks: tuple[str, ...], merge: bool,
                   save_model: bool, eval_limit: int | None, ppl_tokens: int, trust_remote_code: bool) -> dict:
    from s2d.assets import load_model
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
            from s2d.eval.search_probe import TaskProbe

            probe = TaskProbe(model, tokenizer, config)
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
    metrics = {"model": str(model_spec), "compression": compression, "eval": results,
               "peak_rss_mb_process": peak_rss_mb(),
               "units": {"seconds": "wall-clock seconds of the compression", "peak_rss_mb": "MiB (ru_maxrss)",
                         "macs": "multiply-accumulates per token in the block Linears"}}
    run.write_metrics(metrics)
    ranks_figure(report, run.figure_path("ranks.png"))
    run.write_text("report.md", report_markdown(model_spec, report, results))
    return metrics


def _from_disk(folder: str, config: LowRankConfig, out: Path, trust_remote_code: bool) -> CompressionReport:
    """compress_folder, with a truncated or corrupt shard reported as the user's problem it is."""
    from safetensors import SafetensorError

    from s2d.errors import S2DError

    try:
        return compress_folder(folder, config, out, trust_remote_code=trust_remote_code)
    except (SafetensorError, OSError, EOFError) as err:
        raise S2DError(f"cannot read the weights in {folder}: {err}. The file may be truncated or corrupt: "
                       "re-create it (re-run the command that wrote it, or copy it again)") from err


def _json(obj) -> bytes:
    import json

    from s2d.io import nulled

    return (json.dumps(nulled(obj), indent=1, allow_nan=False) + "\n").encode()


def report_markdown(model_spec: str, report: CompressionReport, results: dict) -> str:
    from s2d.report import md_table

    s = report.summary
    command = "s2d " + " ".join(sys.argv[1:]) if sys.argv[1:] else f"s2d compress {model_spec}"
    rows = [("method", report.method), ("parameters", f"{s['params_before']:,} → {s['params_after']:,}"),
            ("fraction of the model kept", f"{s['fraction_kept']:.4f}"),
            ("fraction of block-Linear parameters kept", f"{s['block_linear_fraction_kept']:.4f}"),
            ("block-Linear MACs per token", f"{s['block_linear_macs_per_token_before']:,} → "
                                            f"{s['block_linear_macs_per_token_after']:,}"),
            ("Linears decomposed", s["layers_decomposed"]), ("b", s["b"]),
            ("blocks decomposed", s["blocks_decomposed"]),
            ("calibration tokens", report.calibration_tokens), ("seconds", round(report.seconds, 1)),
            ("peak RSS (MiB)", round(report.peak_rss_mb))]
    if report.search and report.search["variant"] == "ppl":
        rows.append(("search ppl (ref → final)", f"{report.search['ppl_ref']:.3f} → {report.search['ppl_final']:.3f}"))
    elif report.search:
        rows.append((f"search {report.search['task']} acc per chunk (ref → final)",
                     f"{_accs(report.search['acc_ref'])} → {_accs(report.search['acc_final'])}"))
    if report.search:
        rows.append(("search layers processed", report.search["layers_processed"]))
    parts = [f"# Low-rank compression of {model_spec}\n", f"Command: `{command}`\n",
             md_table(["", "value"], rows), "![ranks](figures/ranks.png)\n"]
    if results:
        ev = [(k, v.get("ppl", v.get("acc")), v.get("acc_norm", "")) for k, v in results.items()]
        parts += ["## Evaluation\n", md_table(["task", "ppl or acc", "acc_norm"], ev)]
    return "\n".join(parts)


def _accs(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)
