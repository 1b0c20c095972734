"""`s2d eval`: load a model, score it on perplexity and the zero-shot tasks, write the run folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from s2d.commands.load import load_model, source_of
from s2d.eval.suite import DEFAULT_TASKS, EvalConfig, evaluate, tasks_for
from s2d.report.eval import report_markdown
from s2d.runs import RunFolder


def run_eval(model_spec: str, config: EvalConfig, out: str | Path, trust_remote_code: bool = False,
             mode: str = "new", argv: list[str] | None = None) -> dict:
    """Load a model, evaluate it, and write config.yaml, metrics.json and report.md into the run folder `out`."""
    config.validate()
    with RunFolder(out, "eval", {"model": str(model_spec), **config.to_dict()}, seed=config.seed, mode=mode,
                   argv=argv) as run:
        model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
        config = dataclasses.replace(config, tasks=tasks_for(model, config.tasks, DEFAULT_TASKS))
        results = evaluate(model, tokenizer, config)
        metrics = {"model": str(model_spec), **source_of(model), "tasks": results,
                   "units": {"ppl": "exp(mean NLL per scored token)", "nll_mean": "nats per token",
                             "acc": "fraction", "seconds": "wall-clock seconds",
                             "ss, lms, icat, pct_stereotype": "percent (0-100); *_ci95: bootstrap 95% interval",
                             "likelihood_diff": "nats"}}
        run.write_metrics(metrics)
        run.write_text("report.md", report_markdown(str(model_spec), config, results,
                                                    run.command_line(f"eval {model_spec}")))
    return metrics
