"""Evaluation: token perplexity, zero-shot multiple choice on real local data, classification accuracy,
and an optional bridge to lm-evaluation-harness (`s2d.eval.lm_eval_bridge`, needs the lm-eval extra)."""

from s2d.eval.classify import classification_accuracy
from s2d.eval.multiple_choice import MCExample, MCResult, encode_pair, loglikelihood_tokens, score_multiple_choice
from s2d.eval.perplexity import CONVENTIONS, PerplexityResult, perplexity
from s2d.eval.suite import EvalConfig, evaluate
from s2d.eval.tasks import TASKS, Task, build_task

__all__ = [
    "CONVENTIONS", "EvalConfig", "MCExample", "MCResult", "PerplexityResult", "TASKS", "Task", "build_task",
    "classification_accuracy", "encode_pair", "evaluate", "loglikelihood_tokens", "perplexity",
    "score_multiple_choice",
]
