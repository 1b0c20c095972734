import pytest
import torch

from s2d.assets import load_model
from s2d.regularize import S2DConfig, SelectiveSpectralDecay
from s2d.train.hf import RegularizedTrainer


def _trainer(tmp_path, model, reg, steps=2):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    if reg is None:
        return Trainer(model=model, args=args, train_dataset=data), data
    return RegularizedTrainer(regularizer=reg, model=model, args=args, train_dataset=data), data


def test_trainer_loss_changes_by_exactly_the_penalty(tmp_path):
    model, _ = load_model("tiny:llama")
    reg = SelectiveSpectralDecay(model, S2DConfig(selection="all", lam=0.7))
    plain, data = _trainer(tmp_path / "plain", model, None)
    regular, _ = _trainer(tmp_path / "reg", model, reg)
    batch = {"input_ids": torch.stack([d["input_ids"] for d in data[:2]]),
             "labels": torch.stack([d["labels"] for d in data[:2]])}
    base = plain.compute_loss(model, dict(batch))
    with_reg = regular.compute_loss(model, dict(batch))
    penalty = reg.penalty()
    assert float(penalty.detach()) > 0
    assert float((with_reg - base).detach()) == pytest.approx(float(penalty.detach()), rel=1e-5)


def test_trainer_runs_decoupled_s2d(tmp_path):
    model, _ = load_model("tiny:llama")
    reg = SelectiveSpectralDecay(model, S2DConfig(selection="all", form="decoupled", lam=1.0, refresh_every=1))
    trainer, _ = _trainer(tmp_path, model, reg, steps=2)
    trainer.train()
    assert reg.steps == 2 and len(reg.log) == 2
