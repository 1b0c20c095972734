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


def reading(result: dict) -> list[str]:
    """A few sentences a person can act on: where the massive activations start, who writes them, and why."""
    lines = []
    residual, linears = result["residual"], result["linears"]
    massive_blocks = [r["block"] for r in residual if r["massive_count"] > 0]
    if massive_blocks:
        first = massive_blocks[0]
        peak = max(residual, key=lambda r: r["max_abs"])
        channels = sorted({m["channel"] for r in residual for m in r["massive"]})
        tokens = sorted({m["token"] for r in residual for m in r["massive"]})
        lines.append(f"Massive activations (|x| > 100 and ≥ 1000× the median) enter the residual stream at block "
                     f"{first} and persist in {len(massive_blocks)} of {len(residual)} blocks, peaking at "
                     f"{peak['max_abs']:.3g} after block {peak['block']}. They sit in channel(s) "
                     f"{', '.join(map(str, channels[:6]))} at token position(s) {', '.join(map(str, tokens[:6]))}.")
        writers = [lin for lin in linears if lin["block"] <= first and lin["output"]["massive_count"] > 0]
        source = max(writers or [lin for lin in linears if lin["block"] <= first],
                     key=lambda lin: lin["output"]["max_abs"])
        at_peak = source["pcdr_at_peak"]
        share = at_peak[0] if at_peak else 0.0
        top = at_peak[-1] if at_peak else 0.0
        verdict = ("its top singular component alone produces it" if share >= 0.8 else
                   f"its top singular component alone produces {share:.0%} of it" if share >= 0.5 else
                   f"its top {len(at_peak)} components produce {top:.0%} of it" if top >= 0.5 else
                   "its top components do not dominate it: the outlier is spread over many directions")
        pcdr_text = ", ".join(f"PCDR{k + 1} = {v:.2f}" for k, v in enumerate(at_peak))
        lines.append(f"The Linear that writes it is {source['name']} ({source['role']}, block {source['block']}): "
                     f"output max|x| {source['output']['max_abs']:.3g}, σ₁ = {source['sigma1']:.3g}. At that token "
                     f"{pcdr_text}, so {verdict}.")
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
    top = sorted(linears, key=lambda lin: lin["output"]["max_abs"], reverse=True)[:3]
    lines.append("Largest Linear outputs: " + "; ".join(
        f"{lin['name']} {lin['output']['max_abs']:.3g} (σ₁ {lin['sigma1']:.3g}, PCDR₁ "
        f"{lin['pcdr'][0]:.2f})" for lin in top) + ".")
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
