"""S2D (or any s2d regularizer) inside `transformers.Trainer`, in two lines:

    reg = SelectiveSpectralDecay(model, S2DConfig())
    trainer = RegularizedTrainer(regularizer=reg, model=model, args=args, train_dataset=ds)
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback


class _RegularizerStep(TrainerCallback):
    """Calls `reg.step(lr)` right after each optimizer step, before the schedule moves the learning rate."""

    def __init__(self, regularizer):
        self.regularizer = regularizer

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
        self.regularizer.step(lr=lr)


class RegularizedTrainer(Trainer):
    """A Trainer whose loss is the task loss plus `regularizer.penalty()`."""

    def __init__(self, *args, regularizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self.add_callback(_RegularizerStep(regularizer))

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss = loss + self.regularizer.penalty()
        return (loss, outputs) if return_outputs else loss
