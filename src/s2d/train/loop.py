"""One fine-tuning loop for every task: AdamW, warmup + cosine, clipping, accumulation, regularizer hooks,
periodic evaluation, atomic checkpoints with exact resume, and data parallelism through torch.distributed."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from s2d.arch.finite import first_nonfinite_tensor, scan_outputs
from s2d.errors import S2DError
from s2d.regularize.registry import make_regularizer
from s2d.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from s2d.train.config import TrainConfig
from s2d.train.distributed import DistributedContext
from s2d.train.monitor import ActivationMonitor, sigma_max


@dataclass
class TrainResult:
    """What a run produced, over its whole life: a resumed run's record includes the steps before the resume."""

    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    reg_log: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """Linear warmup over `warmup` steps, then cosine decay to zero at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay only ≥2-D parameters, as nanoGPT does; norms and biases are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def train(model, task, config: TrainConfig, checkpoint_dir: Path | None = None, model_name: str = "model",
          progress: bool = True) -> TrainResult:
    """Fine-tune `model` on `task`; resumes from the newest checkpoint in `checkpoint_dir` if there is one."""
    ctx = DistributedContext.from_env()
    config.validate(ctx.world_size)
    torch.manual_seed(config.seed)
    found = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if found is None:  # a resumed run loads its (learned) static QAT scales with the weights instead
        _calibrate_static_qat(model, task, config, ctx)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    reg = make_regularizer(config.reg, model, config.reg_config, optimizer)
    scheduler = cosine_with_warmup(optimizer, config.warmup, config.steps)
    wrapped = ctx.wrap(model)
    monitor = ActivationMonitor(model)
    meta = {"model": model_name, "world_size": ctx.world_size,
            "n_parameters": sum(p.numel() for p in model.parameters()), "config": config.to_dict()}
    result, start = TrainResult(), 0
    if found is not None:
        start, record = load_checkpoint(found, model, optimizer, scheduler, reg, meta)
        result.resumed_from, result.history, result.evals = start, record["history"], record["evals"]
        if reg is not None:
            reg.log = record["reg_log"]
    last_good = found if checkpoint_dir is not None else None
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc=f"finetune {config.task}", disable=not progress or not ctx.is_main,
               initial=start, total=config.steps)
    for step in bar:
        model.train()
        monitor.reset()
        task_loss = 0.0
        for batch in _micro_batches(task, config, ctx, step):
            loss = wrapped(**batch).loss / config.grad_accum
            loss.backward()
            task_loss += float(loss.detach())
        task_loss = ctx.mean(task_loss)
        if not math.isfinite(task_loss):  # checked first: the regularizer's SVD would fail on a NaN weight
            raise _diverged(f"the loss became {task_loss}", step, model, _micro_batches(task, config, ctx, step),
                            None, last_good)
        try:
            penalty = reg.penalty() if reg is not None else None
        except torch.linalg.LinAlgError as err:
            raise _diverged(f"the {config.reg} regularizer failed ({err})", step, model, (), None, last_good) from None
        if penalty is not None and penalty.requires_grad:
            penalty.backward()
        try:  # a non-finite norm raises before clipping scales the gradients, which then still show where
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip, error_if_nonfinite=True))
        except RuntimeError:
            raise _diverged("the gradient norm became non-finite", step, model,
                            _micro_batches(task, config, ctx, step), penalty, last_good) from None
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if reg is not None:
            reg.step(lr=lr)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            result.history.append({"step": done, "loss": task_loss, "lr": lr, "grad_norm": grad_norm,
                                   "penalty": float(penalty.detach()) if penalty is not None else 0.0,
                                   "max_abs_act": monitor.max_abs, "sigma_max": sigma_max(model)})
            bar.set_postfix(loss=f"{task_loss:.3f}")
        if ctx.is_main and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            model.eval()
            result.evals.append({"step": done, **task.evaluate(model)})
        if checkpoint_dir is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            if ctx.is_main:
                record = {"history": result.history, "evals": result.evals,
                          "reg_log": reg.log if reg is not None else []}
                last_good = save_checkpoint(checkpoint_dir / f"step-{done}", model, optimizer, scheduler, reg,
                                            done, meta, record)
                prune_checkpoints(checkpoint_dir, config.keep_checkpoints)
            ctx.barrier()
    monitor.remove()
    if reg is not None:
        result.reg_log = reg.log
        reg.remove()
    model.eval()
    result.steps, result.seconds = config.steps, time.perf_counter() - t0
    return result


def _calibrate_static_qat(model, task, config: TrainConfig, ctx: DistributedContext) -> None:
    """Static QAT scales from the micro-batches of the first qat_calib_steps steps, before the optimizer sees them.
    Before the DDP wrap too, which copies rank 0's parameters (these scales included) to every rank."""
    if not config.qat:
        return
    from s2d.quant.qat import calibrate_qat, needs_qat_calibration

    if needs_qat_calibration(model):
        calibrate_qat(model, (batch for step in range(config.qat_calib_steps)
                              for batch in _micro_batches(task, config, ctx, step)))


def _micro_batches(task, config: TrainConfig, ctx: DistributedContext, step: int) -> Iterator[dict]:
    return (task.batch(step, micro, config.micro_batch, ctx.rank, ctx.world_size)
            for micro in range(config.grad_accum))


def _diverged(what: str, step: int, model, batches: Iterable[dict], penalty, last_good: Path | None) -> S2DError:
    """The error for a non-finite loss or gradient norm at `step`, naming where it first went wrong."""
    where = _first_nonfinite(model, batches, penalty)
    saved = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written before it"
    return S2DError(f"{what} at step {step}: {where}. Lower the learning rate or check the data ({saved})")


def _first_nonfinite(model, batches: Iterable[dict], penalty) -> str:
    """Where a divergence starts: a non-finite parameter, else the penalty, else the first module whose output
    is NaN or Inf on a replay of the step's batches, else the activation and gradient that blew up the norm."""
    if (name := first_nonfinite_tensor(model)) is not None:
        return f"parameter {name} holds NaN or Inf"
    if penalty is not None and not torch.isfinite(penalty).all():
        return f"the regularizer's penalty is {float(penalty)}"
    largest = (0.0, "")
    for batch in batches:
        bad, big = scan_outputs(model, batch)
        if bad == "":
            return "every layer's output is finite but the loss is not: check the labels"
        if bad is not None:
            return f"the first module whose output is NaN or Inf is {bad} ({type(model.get_submodule(bad)).__name__})"
        largest = max(largest, big)
    grads = {n: float(p.grad.abs().max()) for n, p in model.named_parameters() if p.grad is not None}
    if not grads or not largest[1]:
        return "no parameter, activation or gradient on this rank is NaN or Inf (another rank's batch diverged?)"
    top = max(grads, key=grads.get)
    return (f"the forward is finite but the gradients overflow; the largest activation is the output of {largest[1]} "
            f"(|x| up to {largest[0]:.3g}) and the largest gradient is in {top} ({grads[top]:.3g})")
