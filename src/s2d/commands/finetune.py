"""`s2d finetune`: load, train, and write the run folder (config, curves, metrics, report, final model)."""

from __future__ import annotations

from pathlib import Path

import torch

from s2d.commands.load import load_model, source_of
from s2d.commands.tasks import make_task
from s2d.io import atomic_dir, nbytes
from s2d.report.curves import plot_curve
from s2d.report.markdown import md_table
from s2d.runs import RunFolder
from s2d.train.config import TrainConfig
from s2d.train.distributed import DistributedContext
from s2d.train.loop import TrainResult, train

HEADS = {"cls": ("sequence-classification", 2), "image": ("image-classification", 10)}


def finetune(model_spec: str, config: TrainConfig, out: str | Path, progress: bool = True,
             trust_remote_code: bool = False, mode: str = "new", argv: list[str] | None = None) -> TrainResult:
    """Fine-tune `model_spec` under `config`; with mode="resume", continue from `out/checkpoints`."""
    ctx = DistributedContext.from_env()
    config.validate(ctx.world_size)
    if not ctx.is_main:  # only rank 0 writes the run folder; the others wait until it has settled the folder
        ctx.barrier()
        return _finetune_into(None, model_spec, config, out, progress, trust_remote_code)
    with RunFolder(out, "finetune", {"model": model_spec, **config.to_dict()}, config.seed, mode=mode,
                   resumable=True, argv=argv) as run:
        ctx.barrier()
        return _finetune_into(run, model_spec, config, out, progress, trust_remote_code)


def _finetune_into(run: RunFolder | None, model_spec: str, config: TrainConfig, out: str | Path, progress: bool,
                   trust_remote_code: bool) -> TrainResult:
    head, labels = HEADS.get(config.task, (None, None))
    torch.manual_seed(config.seed)  # a fresh classifier head is initialized from the seed
    model, tokenizer = load_model(model_spec, head=head, num_labels=labels, trust_remote_code=trust_remote_code)
    if config.qat:
        from s2d.quant import prepare_qat

        # FakeQuantLinear keeps nn.Linear's parameters and state-dict keys, so S2D, checkpoints and
        # save_pretrained see an ordinary model; only the forward rounds weights and inputs.
        prepare_qat(model, config.qat_config(), learn_scales=config.qat_learn_scales,
                    learn_act_scales=not config.qat_fixed_act_scales)
    task = make_task(config, model, tokenizer, name=model_spec)
    result = train(model, task, config, Path(out) / "checkpoints", model_name=model_spec, progress=progress)
    if run is not None:
        _write(run, model, tokenizer, config, result, model_spec)
    return result


def _refresh_summary(record: dict) -> dict:
    """One S2D refresh as the run folder keeps it: the selected layers with their k_target, σ and PCDR (the
    trajectory of what S2D acts on)."""
    chosen = {n: rec for n, rec in record["layers"].items() if rec["k_target"]}
    return {"step": record["step"], "penalty_value": record.get("penalty_value"),
            "selected": {n: rec["k_target"] for n, rec in chosen.items()},
            "selected_sigma": {n: rec["sigma"] for n, rec in chosen.items()},
            "selected_pcdr": {n: rec.get("pcdr") for n, rec in chosen.items()}}


def _write(run: RunFolder, model, tokenizer, config: TrainConfig, result: TrainResult, model_spec: str) -> None:
    figures = {
        "loss": plot_curve(result.history, "loss", run.figure_path("loss.png"), "task loss"),
        "sigma_max": plot_curve(result.history, "sigma_max", run.figure_path("sigma_max.png"),
                                "largest σ₁ of the targeted Linears"),
        "max_abs_act": plot_curve(result.history, "max_abs_act", run.figure_path("max_abs_act.png"),
                                  "max |x| in the residual stream (training batch)", log=True),
    }
    metrics = {"model": model_spec, **source_of(model), "task": config.task, "reg": config.reg,
               "reg_config": config.reg_config,
               "qat": config.qat, "qat_config": config.qat_config().to_dict() if config.qat else None,
               "steps": result.steps, "seconds": result.seconds, "resumed_from": result.resumed_from,
               "history": result.history, "evals": result.evals,
               "refreshes": [_refresh_summary(r) for r in result.reg_log]}
    if config.qat:
        import copy

        from s2d.quant import convert_qat, save_quantized, strip_qat

        # The integers the QAT forward rounded to and its static activation scales (learned, if so), then the
        # plain float model.
        integer = convert_qat(copy.deepcopy(model), config.qat_config())
        save_quantized(integer, run.path / "model-quantized", tokenizer, config.qat_config())
        strip_qat(model)
    with atomic_dir(run.path / "model", needed=nbytes(model.state_dict().values())) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    run.write_metrics(metrics)  # last of the results: a folder with metrics.json has its models (resume relies on it)
    last = result.history[-1] if result.history else {}
    rows = [[k, last.get(k)] for k in ("loss", "penalty", "sigma_max", "max_abs_act")]
    rows += [[k, v] for k, v in (result.evals[-1].items() if result.evals else []) if k != "step"]
    text = [f"# finetune {model_spec} on {config.task} with reg={config.reg}\n",
            f"{result.steps} steps in {result.seconds:.1f} s.\n", md_table(["final", "value"], rows)]
    if config.qat:
        q = config.qat_config()
        acts = ("floating-point activations" if q.a_bits is None else
                f"dynamic {q.a_granularity.replace('_', '-')} activation scales" if not q.a_static else
                f"per-tensor static activation scales calibrated ({q.a_observer}) on the first "
                f"{config.qat_calib_steps} step(s)' batches, then "
                f"{'kept fixed' if config.qat_fixed_act_scales else 'learned (LSQ)'}")
        refit = ", which `s2d quantize` would calibrate afresh instead of using QAT's scales" if q.a_static else ""
        text.append(f"\nTrained with {config.qat} quantization-aware training with {acts}"
                    f"{' and learned weight scales' if config.qat_learn_scales else ''}. `model-quantized/` holds the "
                    "integer model whose forward QAT simulated, with those scales (load it with `s2d.load_model`); "
                    f"`model/` the float weights{refit}.\n")
    text += [f"\n![{name}](figures/{path.name})\n" for name, path in figures.items()]
    run.write_text("report.md", "\n".join(text))
