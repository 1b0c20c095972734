"""One fine-tuning loop for every task: AdamW, warmup + cosine, clipping, accumulation, regularizer hooks,
periodic evaluation, atomic checkpoints with exact resume, and data parallelism through torch.distributed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from s2d.errors import S2DError
from s2d.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from s2d.train.config import TrainConfig
from s2d.train.distributed import DistributedContext
from s2d.train.monitor import ActivationMonitor, sigma_max


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    reg_log: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None


def make_regularizer(name: str, model, options: dict, optimizer):
    from s2d import regularize as R

    if name == "none":
        return None
    if name == "s2d":
        return R.SelectiveSpectralDecay(model, R.S2DConfig.from_dict(options), optimizer=optimizer)
    cls, cfg = {"wd": (R.WeightDecay, R.WeightDecayConfig), "specnorm": (R.SpectralNorm, R.SpectralNormConfig),
                "kure": (R.KURE, R.KUREConfig)}[name]
    return cls(model, cfg.from_dict(options))


def cosine_with_warmup(optimizer, warmup: int, total: int):
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
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    reg = make_regularizer(config.reg, model, config.reg_config, optimizer)
    scheduler = cosine_with_warmup(optimizer, config.warmup, config.steps)
    wrapped = ctx.wrap(model)
    monitor = ActivationMonitor(model)
    meta = {"model": model_name, "world_size": ctx.world_size,
            "n_parameters": sum(p.numel() for p in model.parameters()), "config": config.to_dict()}
    result, start = TrainResult(), 0
    if checkpoint_dir is not None and (found := latest_checkpoint(checkpoint_dir)) is not None:
        start = load_checkpoint(found, model, optimizer, scheduler, reg, meta)
        result.resumed_from = start
    last_good = found if checkpoint_dir is not None else None
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc=f"finetune {config.task}", disable=not progress or not ctx.is_main,
               initial=start, total=config.steps)
    for step in bar:
        model.train()
        monitor.reset()
        task_loss = 0.0
        for micro in range(config.grad_accum):
            batch = task.batch(step, micro, config.micro_batch, ctx.rank, ctx.world_size)
            loss = wrapped(**batch).loss / config.grad_accum
            loss.backward()
            task_loss += float(loss.detach())
        penalty = reg.penalty() if reg is not None else None
        if penalty is not None and penalty.requires_grad:
            penalty.backward()
        task_loss = ctx.mean(task_loss)
        if not math.isfinite(task_loss):
            where = f"; the last good checkpoint is {last_good}" if last_good else ""
            raise S2DError(f"the loss became {task_loss} at step {step}: lower the learning rate or check the data"
                           + where)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip))
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
                last_good = save_checkpoint(checkpoint_dir / f"step-{done}", model, optimizer, scheduler, reg,
                                            done, meta)
                prune_checkpoints(checkpoint_dir, config.keep_checkpoints)
            ctx.barrier()
    monitor.remove()
    if reg is not None:
        result.reg_log = reg.log
        reg.remove()
    model.eval()
    result.steps, result.seconds = config.steps, time.perf_counter() - t0
    return result
