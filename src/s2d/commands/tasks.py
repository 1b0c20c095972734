"""The three fine-tuning tasks. Each batch is a pure function of (seed, step, micro-step, rank), so a
resumed or distributed run sees exactly the data an uninterrupted single-process run would."""

from __future__ import annotations

import torch

from s2d.errors import S2DError


def _generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)


def _shard(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return rows.chunk(world)[rank] if world > 1 else rows


class LMTask:
    """Causal LM on wiki train text; evaluation is perplexity on validation windows."""

    def __init__(self, tokenizer, seq_len: int, seed: int, eval_samples: int):
        from s2d.assets import wiki_tokens

        self.seq_len, self.seed = seq_len, seed
        self.tokens = wiki_tokens(tokenizer, "train")
        val = wiki_tokens(tokenizer, "validation")
        n = min(eval_samples, val.numel() // seq_len)
        if n == 0 or self.tokens.numel() <= seq_len:
            raise S2DError(f"seq_len {seq_len} is longer than the available text")
        self.val = val[: n * seq_len].view(n, seq_len)

    def batch(self, step: int, micro: int, size: int, rank: int = 0, world: int = 1) -> dict:
        gen = _generator(self.seed, step, micro)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (size,), generator=gen)
        ids = _shard(torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()]), rank, world)
        return {"input_ids": ids, "labels": ids}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        from s2d.eval import perplexity

        result = perplexity(model, self.val.flatten(), seq_len=self.seq_len, progress=False)
        return {"val_ppl": result.ppl, "val_tokens": result.n_tokens}


class ClassificationTask:
    """Sentence classification on the polarity data: 160 train / 40 evaluation sentences, split by seed."""

    def __init__(self, tokenizer, seq_len: int, seed: int):
        from s2d.assets import load_polarity

        rows = load_polarity()
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        self.train_rows = [rows[i] for i in order[:160]]
        self.eval_rows = [rows[i] for i in order[160:]]
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed

    def _encode(self, rows) -> dict:
        enc = self.tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=self.seq_len,
                             return_tensors="pt")
        enc["labels"] = torch.tensor([label for _, label in rows])
        return dict(enc)

    def batch(self, step: int, micro: int, size: int, rank: int = 0, world: int = 1) -> dict:
        idx = torch.randint(0, len(self.train_rows), (size,), generator=_generator(self.seed, step, micro))
        idx = _shard(idx, rank, world)
        return self._encode([self.train_rows[i] for i in idx.tolist()])

    def eval_batch(self) -> dict:
        """The held-out sentences, encoded, with their labels."""
        return self._encode(self.eval_rows)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        from s2d.eval import classification_accuracy

        return {"val_acc": classification_accuracy(model, self.eval_batch())}


class ImageTask:
    """Image classification (digits or Fashion-MNIST), resized to the model's input size."""

    def __init__(self, config, model_config, seed: int, eval_samples: int):
        from s2d.assets import image_split

        self.train, self.test = (image_split(config.image_data, split, config.image_folder, seed)
                                 for split in ("train", "test"))
        self.size = int(model_config.image_size)
        self.channels = int(getattr(model_config, "num_channels", 1))
        self.seed, self.eval_samples = seed, eval_samples

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        from s2d.assets import pixel_values

        return pixel_values(images, self.size, self.channels)

    def batch(self, step: int, micro: int, size: int, rank: int = 0, world: int = 1) -> dict:
        idx = torch.randint(0, len(self.train[1]), (size,), generator=_generator(self.seed, step, micro))
        idx = _shard(idx, rank, world)
        return {"pixel_values": self._pixels(self.train[0][idx]), "labels": self.train[1][idx]}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        from s2d.eval import classification_accuracy

        n = min(self.eval_samples, len(self.test[1]))
        batch = {"pixel_values": self._pixels(self.test[0][:n]), "labels": self.test[1][:n]}
        return {"val_acc": classification_accuracy(model, batch)}


# The model kind (s2d.arch's Family.kind) each task trains, and how a message names that kind.
TASK_KIND = {"lm": "causal-lm", "cls": "encoder", "image": "vision"}
KIND_WORDS = {"causal-lm": "a decoder", "encoder": "an encoder", "vision": "a vision model"}


def check_task_fits(task: str, model, name: str | None = None) -> None:
    """Refuse a task the model cannot train (an LM loss on an encoder, images into a text model, ...), naming
    the --task that does fit; decided by the architecture adapter's kind, never by the model's name."""
    from s2d.arch import describe
    from s2d.arch.families import FAMILIES

    need = TASK_KIND.get(task)
    if need is None:
        raise S2DError(f"task must be lm, cls or image (got {task!r})")
    desc = describe(model)
    if desc.kind == need:
        return
    families = ", ".join(f.name for f in FAMILIES if f.kind == need)
    name = name or getattr(model, "name_or_path", "") or type(model).__name__
    fits = {kind: t for t, kind in TASK_KIND.items()}.get(desc.kind)
    todo = f"use --task {fits}" if fits else f"use {KIND_WORDS[need]} model with --task {task}"
    raise S2DError(f"task {task} needs {KIND_WORDS[need]} ({families}); {name} is "
                   f"{KIND_WORDS.get(desc.kind, desc.kind)} ({desc.family.name}): {todo}")


def make_task(config, model, tokenizer, name: str | None = None):
    """The task `config.task` names, for `model`; a model that cannot train it raises S2DError."""
    check_task_fits(config.task, model, name)
    if config.task != "image" and tokenizer is None:
        raise S2DError(f"task {config.task} needs a tokenizer, and this model folder has none: add its "
                       "tokenizer files (tokenizer.json or tokenizer_config.json) next to config.json")
    if config.task == "lm":
        return LMTask(tokenizer, config.seq_len, config.seed, config.eval_samples)
    if config.task == "cls":
        return ClassificationTask(tokenizer, config.seq_len, config.seed)
    return ImageTask(config, model.config, config.seed, config.eval_samples)
