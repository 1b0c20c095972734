"""Bridge to lm-evaluation-harness (the optional `lm-eval` extra): run its HF wrapper on an in-memory model.

Any model s2d produces (dense, quantized, low-rank) is wrapped by lm-eval's `HFLM` without a reload, so
lm-eval's task registry can evaluate it. Offline, s2d's own tasks are exported as JSONL plus a local task
YAML, which proves the path end to end and lets the two scorers be compared on identical requests.

Pitfalls handled here: HFLM calls `model.tie_weights()` (which would re-tie a replaced `lm_head` to the
embeddings), its default max_length comes from the model's positions (we always pass one), local
`data_files` resolve against the working directory (we write absolute paths), and datasets must stay offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from torch import nn

from s2d.errors import S2DError
from s2d.eval.tasks import Task
from s2d.io import atomic_write_text, ensure_writable_dir

LM_EVAL_INSTALL = "pip install 'lm-eval[hf]==0.4.13'  (or pip install -e '.[lm-eval]')"
TASK_PREFIX = "s2d_"


def require_lm_eval():
    """Import lm_eval or raise S2DError with the install command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
    except ImportError as err:
        raise S2DError(f"the lm-eval bridge needs lm-evaluation-harness: run `{LM_EVAL_INSTALL}`") from err
    return lm_eval


def _head_state(model: nn.Module) -> list[tuple[str, int, int]]:
    """Identity of the output head's module and tensors, to detect any re-tie."""
    from s2d.arch import describe

    head_name = describe(model).head
    if head_name is None:
        return []
    head = model.get_submodule(head_name)
    return [(head_name, id(head), 0)] + [(n, id(t), t.data_ptr()) for n, t in head.state_dict(keep_vars=True).items()]


@contextlib.contextmanager
def _no_tie_weights(model: nn.Module):
    """Make `model.tie_weights()` a no-op for the duration, then restore the class method."""
    had_attr = "tie_weights" in vars(model)
    saved = vars(model).get("tie_weights")
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if had_attr:
            model.tie_weights = saved
        else:
            del model.tie_weights


def make_hflm(model: nn.Module, tokenizer, max_length: int, batch_size: int = 16):
    """lm-eval's HFLM around an in-memory causal LM, with the head left exactly as it is."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from s2d.eval.perplexity import check_causal_lm, check_seq_len

    check_causal_lm(model)
    check_seq_len(model, max_length)
    if tokenizer is None:
        raise S2DError("lm-eval needs the model's tokenizer")
    before = _head_state(model)
    with _no_tie_weights(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    if _head_state(model) != before:
        raise S2DError("lm-eval changed the model's output head while wrapping it; refusing to evaluate a model "
                       "that is no longer the one given")
    return lm


def export_task(task: Task, folder: str | Path) -> tuple[str, Path]:
    """Write `task` as JSONL and an lm-eval task YAML into `folder`; returns (lm-eval task name, YAML path)."""
    folder = ensure_writable_dir(Path(folder).resolve())
    name = TASK_PREFIX + task.name.replace("-", "_")
    rows = [json.dumps({"context": ex.context, "choices": list(ex.choices), "label": ex.label}) for ex in task.examples]
    data = atomic_write_text(folder / f"{name}.jsonl", "\n".join(rows) + "\n")
    # JSON is valid YAML, and json.dumps quotes every string safely. data_files must be absolute:
    # lm-eval resolves relative paths against the working directory, not against this file.
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": task.version, "s2d_version": task.version},
    }
    yaml_path = atomic_write_text(folder / f"{name}.yaml", json.dumps(config, indent=2) + "\n")
    return name, yaml_path


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[Task | str], folder: str | Path, max_length: int,
                   batch_size: int = 16, limit: int | None = None) -> dict[str, dict]:
    """Evaluate with lm-eval, zero-shot: s2d Tasks are exported to `folder`; strings are lm-eval task names.

    Returns {task name: {"acc", "acc_norm", "n", "loglikelihoods" ([doc][option], in doc order)}}.
    Names of lm-eval's own tasks need their datasets in the local HF cache (these machines are offline).
    """
    require_lm_eval()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    names, ours = [], True
    for task in tasks:
        if isinstance(task, Task):
            names.append(export_task(task, folder)[0])
        else:
            names.append(task)
            ours = False
    lm = make_hflm(model, tokenizer, max_length=max_length, batch_size=batch_size)
    # Scanning lm-eval's thousands of built-in task YAMLs takes seconds; skip it when only our tasks run.
    manager = TaskManager(include_path=str(Path(folder).resolve()), include_defaults=not ours)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        out = simple_evaluate(model=lm, tasks=names, num_fewshot=0, limit=limit, task_manager=manager,
                              log_samples=True, bootstrap_iters=0)
    except (KeyError, ValueError, FileNotFoundError, ConnectionError) as err:
        raise S2DError(f"lm-eval could not run {names}: {err}. Standard tasks need their datasets in the local "
                       "HF datasets cache") from err
    results = {}
    for name in names:
        metrics = out["results"][name]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        results[name] = {
            "acc": float(metrics["acc,none"]),
            "acc_norm": float(metrics["acc_norm,none"]),
            "n": len(samples),
            "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        }
    return results


def rolling_loglikelihood(model: nn.Module, tokenizer, texts: list[str], max_length: int,
                          batch_size: int = 1) -> list[float]:
    """lm-eval's `loglikelihood_rolling` of each text (summed log-probability, BOS in front)."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    lm = make_hflm(model, tokenizer, max_length=max_length, batch_size=batch_size)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i)
                for i, text in enumerate(texts)]
    return lm.loglikelihood_rolling(requests, disable_tqdm=True)
