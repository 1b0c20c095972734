"""`s2d diagnose` and `s2d compare`: outlier statistics of one model, or severities of several, with reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from s2d.arch import describe
from s2d.commands.load import load_model, source_of
from s2d.diagnose import DiagnoseConfig, diagnose
from s2d.errors import S2DError
from s2d.report.compare import rank, write_compare_report
from s2d.report.diagnose import write_report
from s2d.runs import RunFolder


def run_diagnose(model_spec: str, config: DiagnoseConfig, out: str | Path, trust_remote_code: bool = False,
                 mode: str = "new", argv: list[str] | None = None) -> tuple[dict, RunFolder]:
    """Diagnose one model into the run folder `out`; returns the result and the folder."""
    config.validate()
    with RunFolder(out, "diagnose", dict(config.to_dict(), model=model_spec), seed=config.seed, mode=mode,
                   argv=argv) as run:
        model, processor = load_model(model_spec, trust_remote_code=trust_remote_code)
        result = diagnose(model, processor, config)
        run.write_metrics(dict(result, model=model_spec, **source_of(model)))
        write_report(run, result, model_spec, run.command_line(f"diagnose {model_spec}"))
    return result, run


def run_compare(model_specs: list[str], config: DiagnoseConfig, out: str | Path, trust_remote_code: bool = False,
                mode: str = "new", argv: list[str] | None = None) -> tuple[list[tuple[str, dict]], RunFolder]:
    """Diagnose each model and rank them by outlier severity; returns the ranking and the run folder."""
    if len(model_specs) < 2:
        raise S2DError(f"compare ranks two or more models, got one ({model_specs[0]}); add another, or use "
                       f"`s2d diagnose {model_specs[0]}` for one model")
    config.validate()
    with RunFolder(out, "compare", dict(config.to_dict(), models=list(model_specs)), seed=config.seed, mode=mode,
                   argv=argv) as run:
        severities, details = {}, {}
        for name in model_specs:
            model, processor = load_model(name, trust_remote_code=trust_remote_code)
            own = config
            if describe(model).kind == "vision" and config.data == "wiki":
                own = dataclasses.replace(config, data="fashion-mnist")  # a ViT is calibrated on images
            result = diagnose(model, processor, own)
            severities[name] = result["severity"]
            details[name] = {"family": result["family"], "reading": result["reading"],
                             "data": f"{own.data}: {result['samples']} × {result['seq_len']}"}
            del model
        run.write_metrics({"severity": severities, "details": details, "ranking": [n for n, _ in rank(severities)]})
        write_compare_report(run, severities, details, run.command_line("compare " + " ".join(model_specs)))
    return rank(severities), run
