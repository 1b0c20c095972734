"""The link study: do the dominant singular values (and PCDR) of a Linear predict how large its outputs get?"""

from __future__ import annotations

import math

from scipy import stats as sps

PREDICTORS = {"sigma1": "σ₁", "pcdr1": "PCDR₁", "pcdr3": "PCDR₃"}


def _predictor(lin: dict, key: str) -> float:
    if key == "sigma1":
        return lin["sigma1"]
    k = int(key[-1])
    return lin["pcdr"][k - 1] if len(lin["pcdr"]) >= k else float("nan")


def _correlate(xs: list[float], ys: list[float]) -> dict:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=False) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return {"n": len(pairs), "spearman": None, "spearman_p": None, "pearson": None, "pearson_p": None}
    x, y = zip(*pairs, strict=False)
    s = sps.spearmanr(x, y)
    p = sps.pearsonr(x, y)
    return {"n": len(pairs), "spearman": float(s.statistic), "spearman_p": float(s.pvalue),
            "pearson": float(p.statistic), "pearson_p": float(p.pvalue)}


def link_study(linears: list[dict]) -> dict:
    """Spearman and Pearson (with p-values) of each predictor against output max|x|: all Linears, then per role."""
    target = [lin["output"]["max_abs"] for lin in linears]
    result = {"all": {key: _correlate([_predictor(lin, key) for lin in linears], target) for key in PREDICTORS}}
    for role in dict.fromkeys(lin["role"] for lin in linears):
        group = [lin for lin in linears if lin["role"] == role]
        ys = [lin["output"]["max_abs"] for lin in group]
        result[role] = {key: _correlate([_predictor(lin, key) for lin in group], ys) for key in PREDICTORS}
    return result


def _strength(rho: float | None, p: float | None) -> str:
    if rho is None:
        return "undefined (too few distinct values)"
    if p is None or p >= 0.05:
        return f"not significant (ρ = {rho:.2f}, p = {p:.2g})"
    size = "strong" if abs(rho) >= 0.6 else "moderate" if abs(rho) >= 0.3 else "weak"
    sign = "positive" if rho > 0 else "negative"
    return f"{size} {sign} (ρ = {rho:.2f}, p = {p:.2g})"


_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
_DEFAULT_RULE = {"abs": 100.0, "ratio": 1000.0}


def _pcdr(k: int) -> str:
    return f"PCDR{str(k).translate(_SUBSCRIPTS)}"


def _pcdr_text(lin: dict) -> str:
    """Both PCDR readings of one Linear, each labelled: at the token of its largest output, and the mean."""
    at_peak, mean = lin["pcdr_at_peak"], lin["pcdr"]
    peak = ", ".join(f"{_pcdr(k + 1)} {v:.2f}" for k, v in enumerate(at_peak)) or "not measured"
    means = ", ".join(f"{_pcdr(k + 1)} {mean[k]:.2f}" for k in sorted({0, len(mean) - 1})) if mean else "not measured"
    return f"PCDR at its largest-output token: {peak}; mean over tokens: {means}"


def _verdict(lin: dict) -> str:
    at_peak = lin["pcdr_at_peak"]
    share = at_peak[0] if at_peak else 0.0
    top = at_peak[-1] if at_peak else 0.0
    return ("its top singular component alone produces that output" if share >= 0.8 else
            f"its top singular component alone produces {share:.0%} of that output" if share >= 0.5 else
            f"its top {len(at_peak)} components produce {top:.0%} of that output" if top >= 0.5 else
            "its top components do not dominate that output: it is spread over many directions")


def _writer(result: dict, first: int) -> tuple[dict | None, int]:
    """The branch, in blocks up to `first`, that adds the most to the residual channel of block `first`'s largest
    massive entry; what a branch adds is its post-norm's output where there is one, else its writer Linear's."""
    at = next(r for r in result["residual"] if r["block"] == first)
    channel = (max(at["massive"], key=lambda m: m["value"])["channel"] if at["massive"]
               else at["top_channels"][0]["channel"])
    branches = [b for b in result.get("branches", []) if b["block"] <= first]
    return (max(branches, key=lambda b: b["channel_absmax"][channel]) if branches else None), channel


def _writer_line(result: dict, first: int) -> str:
    residual = {r["block"]: r for r in result["residual"]}
    by_name = {lin["name"]: lin for lin in result["linears"]}
    branch, channel = _writer(result, first)
    if branch is None:  # a result from before branches were recorded: the largest output up to `first`
        linears = result["linears"]
        writers = [lin for lin in linears if lin["block"] <= first and lin["output"]["massive_count"] > 0]
        source = max(writers or [lin for lin in linears if lin["block"] <= first],
                     key=lambda lin: lin["output"]["max_abs"])
        return (f"The Linear that writes it is {source['name']} ({source['role']}, block {source['block']}): "
                f"output max|x| {source['output']['max_abs']:.3g}, σ₁ = {source['sigma1']:.3g}; "
                f"{_pcdr_text(source)}; so {_verdict(source)}.")
    source, b = by_name[branch["writer"]], branch["block"]
    adds = branch["channel_absmax"][channel]
    kind = {"attn": "attention", "mlp": "MLP"}.get(branch["branch"], branch["branch"])
    where = source["name"] + (f", through {branch['norm']}" if branch["norm"] else "")
    if branch["norm"]:
        own = branch["writer_channel_absmax"][channel]
        adds_text = (f"its output reaches {own:.3g} in channel {channel}, which the post-norm turns into {adds:.3g} "
                     "added to the residual")
    else:
        adds_text = f"it adds up to {adds:.3g} to channel {channel} of the residual"
    after = residual[b]["channel_absmax"][channel]
    jump = (f"that channel goes from {residual[b - 1]['channel_absmax'][channel]:.3g} after block {b - 1} to "
            f"{after:.3g} after block {b}" if b - 1 in residual else f"that channel is {after:.3g} after block {b}")
    return (f"The Linear that writes it is {where} ({source['role']}, the {kind} branch of block {b}): {adds_text}; "
            f"{jump}. The Linear's output max|x| is {source['output']['max_abs']:.3g}, σ₁ = "
            f"{source['sigma1']:.3g}; {_pcdr_text(source)}; so {_verdict(source)}.")


def _unflagged(result: dict) -> str | None:
    """Blocks whose max|x| is large but which have no massive entries because their own median |x| grew."""
    rule = result.get("massive_rule") or _DEFAULT_RULE
    residual = [r for r in result["residual"] if r["median_abs"] > 0]
    if not residual:
        return None
    quiet = min(residual, key=lambda r: r["median_abs"])
    hidden = [r for r in residual if r["massive_count"] == 0 and r["max_abs"] > rule["abs"]
              and r["max_abs"] >= rule["ratio"] * quiet["median_abs"]]
    if not hidden:
        return None
    parts = [f"block {r['block']}: max|x| {r['max_abs']:.3g} but 0 massive, the median is {r['median_abs']:.3g} "
             f"(max/median {r['max_abs'] / r['median_abs']:.3g})" for r in hidden[:4]]
    more = f"; {len(hidden) - 4} more such blocks" if len(hidden) > 4 else ""
    which, their = ("this block", "Its") if len(hidden) == 1 else ("these blocks", "Their")
    text = "; ".join(parts)
    ratio = f"{rule['ratio']:g}"
    return (f"{text[0].upper()}{text[1:]}{more}. {their} median |x| grew, and the massive rule is relative to it "
            f"(|x| > {rule['abs']:g} and ≥ {ratio}× the block's own median), so the {ratio}× rule does not fire "
            f"there; against block {quiet['block']}'s median ({quiet['median_abs']:.3g}) {which} would count as "
            "massive.")


def reading(result: dict) -> list[str]:
    """A few sentences a person can act on: where the massive activations start, who writes them, and why."""
    lines = []
    residual, linears = result["residual"], result["linears"]
    rule = result.get("massive_rule") or _DEFAULT_RULE
    massive_blocks = [r["block"] for r in residual if r["massive_count"] > 0]
    if massive_blocks:
        first = massive_blocks[0]
        peak = max(residual, key=lambda r: r["max_abs"])
        channels = sorted({m["channel"] for r in residual for m in r["massive"]})
        tokens = sorted({m["token"] for r in residual for m in r["massive"]})
        lines.append(f"Massive activations (|x| > {rule['abs']:g} and ≥ {rule['ratio']:g}× the median) enter the "
                     f"residual stream at block {first} and persist in {len(massive_blocks)} of {len(residual)} "
                     f"blocks, peaking at {peak['max_abs']:.3g} after block {peak['block']}. They sit in channel(s) "
                     f"{', '.join(map(str, channels[:6]))} at token position(s) {', '.join(map(str, tokens[:6]))}.")
        lines.append(_writer_line(result, first))
    else:
        peak = max(residual, key=lambda r: r["max_abs"])
        lines.append(f"No massive activations in the residual stream: it peaks at {peak['max_abs']:.3g} after block "
                     f"{peak['block']} (max/median {peak['max_median_ratio']:.3g}).")
        loud = [lin for lin in linears if lin["output"]["massive_count"] > 0]
        if loud:
            worst = max(loud, key=lambda lin: lin["output"]["max_abs"])
            lines.append(f"{len(loud)} Linear output(s) do carry massive values before they reach the stream (a "
                         f"norm or a nonlinearity tames them); the largest is {worst['name']} at "
                         f"{worst['output']['max_abs']:.3g}.")
    note = _unflagged(result)
    if note:
        lines.append(note)
    top = sorted(linears, key=lambda lin: lin["output"]["max_abs"], reverse=True)[:3]
    lines.append("Largest Linear outputs: " + "; ".join(
        f"{lin['name']} {lin['output']['max_abs']:.3g} (σ₁ {lin['sigma1']:.3g}, PCDR₁ mean over tokens "
        f"{lin['pcdr'][0]:.2f}" + (f", at its largest-output token {lin['pcdr_at_peak'][0]:.2f}"
                                   if lin["pcdr_at_peak"] else "") + ")" for lin in top) + ".")
    link = result["link"]["all"]
    lines.append(f"Across all {link['sigma1']['n']} Linears, σ₁ versus output max|x| is "
                 f"{_strength(link['sigma1']['spearman'], link['sigma1']['spearman_p'])}; PCDR₁ versus output "
                 f"max|x| is {_strength(link['pcdr1']['spearman'], link['pcdr1']['spearman_p'])}.")
    roles = [(role, r["sigma1"]["spearman"]) for role, r in result["link"].items()
             if role != "all" and r["sigma1"]["spearman"] is not None]
    if roles:
        best = max(roles, key=lambda t: t[1])
        lines.append(f"Within one role the link is clearest for {best[0]} (Spearman ρ = {best[1]:.2f} between σ₁ and "
                     "output max|x|).")
    return lines
