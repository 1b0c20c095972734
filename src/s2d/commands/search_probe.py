"""The accuracy probes of the surgical rank search (SFSD's task variant, and its image variant): eval's scoring,
lowrank's walk.

A fraction (default 20%) of a zero-shot task is the search split, cut into chunks (default 3); the rest is
the report split, which `EvalConfig(held_out=...)` scores afterwards, so no reported figure saw the search.
Every option of every search example is tokenized once; s2d.lowrank.search.AccuracyProbe caches each batch's
block inputs and calls back here to turn logits into accuracy.

The image search scores a vision model's top-1 accuracy on `search_images` train images of the `--calib` set: the
ones that follow the calibration images in the same seeded order, so the search sees no calibration image and
no test image (`--eval image:...` scores the test split).
"""

from __future__ import annotations

from s2d.arch import describe
from s2d.errors import S2DError
from s2d.eval.multiple_choice import choose, continuation_loglikelihood, mc_requests, padded_batches
from s2d.eval.perplexity import max_positions
from s2d.eval.tasks import build_task, split_task
from s2d.lowrank.config import LowRankConfig
from s2d.lowrank.search import AccuracyProbe


def task_probe(model, tokenizer, config: LowRankConfig, batch_size: int = 32) -> AccuracyProbe:
    """Accuracy on `config.search_task`'s search split, per chunk, against the dense model's."""
    if tokenizer is None:
        raise S2DError("the task search needs the model's tokenizer")
    task = build_task(config.search_task, seed=config.seed)
    examples = split_task(task, config.search_fraction)[0].examples
    if len(examples) < config.search_chunks:
        raise S2DError(f"the search split of {task.name} has {len(examples)} examples, fewer than "
                       f"search_chunks={config.search_chunks}; raise search_fraction")
    requests, spans = mc_requests(tokenizer, examples)
    batches = padded_batches(requests, batch_size, max_positions(model) or 2048)

    def score(i: int, logits) -> list[tuple[int, float]]:
        idx, _, rows = batches[i]
        return [(j, continuation_loglikelihood(logits[row], inp, cont)[0])
                for row, (j, (inp, cont)) in enumerate(zip(idx, rows, strict=True))]

    def accuracy(scores: list[list[tuple[int, float]]]) -> list[float]:
        lls = [0.0] * len(requests)
        for batch in scores:
            for j, ll in batch:
                lls[j] = ll
        right = [choose(lls[lo: lo + k], ex.choices)[0] == ex.label
                 for ex, (lo, k) in zip(examples, spans, strict=True)]
        chunks = config.search_chunks
        return [sum(right[c::chunks]) / len(right[c::chunks]) for c in range(chunks)]

    info = {"variant": "task", "task": config.search_task, "split": f"{config.search_fraction:.0%} search split in "
            f"{config.search_chunks} chunks", "search_examples": len(examples)}
    return AccuracyProbe(describe(model), [ids for _, ids, _ in batches], score, accuracy, config.acc_tolerance, info)


def image_probe(model, config: LowRankConfig, batch_size: int = 64) -> AccuracyProbe:
    """Top-1 accuracy on the image search split, per chunk (image i in chunk i mod search_chunks)."""
    import torch

    from s2d.assets import IMAGE_SETS, model_pixels
    from s2d.assets.data import seeded_train_images

    desc = describe(model)
    if desc.kind != "vision":
        raise S2DError(f"the image search needs a vision model; this is a {desc.kind} model: use --search ppl or task")
    if config.calib not in IMAGE_SETS:
        raise S2DError(f"the image search draws its images from --calib, which must be {' or '.join(IMAGE_SETS)} "
                       f"(got {config.calib!r})")
    images, truth = seeded_train_images(config.calib, config.n_samples, config.search_images, seed=config.seed)
    if len(truth) < config.search_images:
        raise S2DError(f"{config.calib} has {config.n_samples + len(truth):,} train images: {config.n_samples:,} "
                       f"calibration plus {config.search_images:,} search images do not fit; lower --search-images "
                       "or --n-samples")
    pixels = model_pixels(model, images)
    starts = range(0, len(truth), batch_size)
    batches = [{"pixel_values": pixels[i: i + batch_size]} for i in starts]

    def score(i: int, logits) -> torch.Tensor:
        return logits.argmax(-1) == truth[i * batch_size: (i + 1) * batch_size]

    def accuracy(scores: list) -> list[float]:
        right = torch.cat(scores)
        chunks = config.search_chunks
        return [int(right[c::chunks].sum()) / len(right[c::chunks]) for c in range(chunks)]  # exact, not float32

    info = {"variant": "image", "images": config.calib, "split": f"{len(truth):,} train images after the "
            f"{config.n_samples:,} calibration ones, in {config.search_chunks} chunks", "search_images": len(truth)}
    return AccuracyProbe(desc, batches, score, accuracy, config.acc_tolerance, info)
