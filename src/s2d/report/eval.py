"""report.md of an `s2d eval` run."""

from __future__ import annotations

from s2d.report.markdown import fmt, md_table


def report_markdown(model_name: str, config, results: dict, command: str) -> str:
    """report.md of an eval run: one table for perplexity, one for the tasks, and the command."""
    ppl = [(k, v["convention"] + (" + BOS" if v.get("bos") else ""), v["seq_len"], v["n_windows"], v["n_tokens"],
            v["ppl"], v["nll_mean"]) for k, v in results.items() if "ppl" in v]
    mc = [(k, v["version"], v["n"], v["acc"], v["acc_norm"], v["chance"]) for k, v in results.items()
          if "acc" in v and v.get("kind") != "image"]
    images = [(k, v["source"], v["acc"], v["chance"]) for k, v in results.items() if v.get("kind") == "image"]
    parts = [f"# Evaluation of {model_name}\n", f"Command: `{command}`\n"]
    if ppl:
        parts += ["## Perplexity\n", md_table(["task", "convention", "seq_len", "windows", "tokens scored", "ppl",
                                               "mean NLL (nats)"], ppl)]
    if mc:
        parts += ["## Zero-shot multiple choice\n",
                  md_table(["task", "version", "examples", "acc", "acc_norm", "chance"], mc)]
    if images:
        parts += ["## Image classification (top-1)\n", md_table(["task", "scored on", "acc", "chance"], images)]
    bias = [(k, v["version"], v["n"], *(_ci(v, m) for m in ("ss", "lms", "icat", "pct_stereotype")))
            for k, v in results.items() if v.get("kind") == "bias" and "acc" not in v]
    if bias:
        parts += ["## Bias (percent, bootstrap 95% interval)\n",
                  md_table(["task", "version", "items", "SS", "LMS", "ICAT", "pct_stereotype"], bias)]
    parts.append(f"Seed {config.seed}; limit {fmt(config.limit)}.\n")
    return "\n".join(parts)


def _ci(result: dict, key: str) -> str:
    if key not in result:
        return "-"
    lo, hi = result[f"{key}_ci95"]
    return f"{result[key]:.1f} [{lo:.1f}, {hi:.1f}]"
