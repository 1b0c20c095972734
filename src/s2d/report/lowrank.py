"""The figure and Markdown of a low-rank compression run (s2d compress)."""

from __future__ import annotations

from pathlib import Path

from s2d.report.figures import save_figure
from s2d.report.markdown import md_table


def ranks_figure(report, path: Path) -> Path:
    """Rank kept per Linear as a fraction of min(d_in, d_out), in model order, coloured by role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.shapes)
    roles = [n.rsplit(".", 1)[-1] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) / 20), 3.2))
    for role in dict.fromkeys(roles):
        xs = [i for i, r in enumerate(roles) if r == role]
        ys = [report.ranks.get(names[i], min(report.shapes[names[i]][:2])) / min(report.shapes[names[i]][:2])
              for i in xs]
        ax.scatter(xs, ys, s=8, label=role)
    ax.set_xlabel("Linear (model order, block by block)")
    ax.set_ylabel("rank / min(d_in, d_out)  (1 = dense)")
    ax.set_title(f"{report.method}: {report.summary['fraction_kept']:.1%} of parameters kept")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=min(7, len(set(roles))), loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def report_markdown(model_spec: str, report, results: dict, command: str) -> str:
    """report.md: the compression summary, the search (if any), the ranks figure and the evaluation."""
    s = report.summary
    rows = [("method", report.method), ("parameters", f"{s['params_before']:,} → {s['params_after']:,}"),
            ("fraction of the model kept", f"{s['fraction_kept']:.4f}"),
            ("fraction of block-Linear parameters kept", f"{s['block_linear_fraction_kept']:.4f}"),
            ("block-Linear MACs per token", f"{s['block_linear_macs_per_token_before']:,} → "
                                            f"{s['block_linear_macs_per_token_after']:,}"),
            ("Linears decomposed", s["layers_decomposed"]), ("b", s["b"]),
            ("blocks decomposed", s["blocks_decomposed"]),
            ("calibration tokens", report.calibration_tokens), ("seconds", round(report.seconds, 1)),
            ("peak RSS (MiB)", round(report.peak_rss_mb))]
    if report.search and report.search["variant"] == "ppl":
        rows.append(("search ppl (ref → final)", f"{report.search['ppl_ref']:.3f} → {report.search['ppl_final']:.3f}"))
    elif report.search:
        scored = report.search.get("task") or f"{report.search['images']} train images"  # task or image search
        rows.append((f"search {scored} acc per chunk (ref → final)",
                     f"{_accs(report.search['acc_ref'])} → {_accs(report.search['acc_final'])}"))
    if report.search:
        rows.append(("search layers processed", report.search["layers_processed"]))
    parts = [f"# Low-rank compression of {model_spec}\n", f"Command: `{command}`\n",
             md_table(["", "value"], rows), "![ranks](figures/ranks.png)\n"]
    if results:
        ev = [(k, v.get("ppl", v.get("acc")), v.get("acc_norm", "")) for k, v in results.items()]
        parts += ["## Evaluation\n", md_table(["task", "ppl or acc", "acc_norm"], ev)]
    return "\n".join(parts)


def _accs(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def structure_figure(rows: list[dict], energies: tuple[float, ...], path: Path, title: str) -> Path:
    """Effective rank / min(d) against depth, per role, in weight and feature space at each energy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(dict.fromkeys(r["role"] for r in rows))
    fig, axes = plt.subplots(2, len(energies), figsize=(4 * len(energies), 6), sharex=True, sharey=True)
    for i, space in enumerate(("weight", "feature")):
        for j, e in enumerate(energies):
            ax = axes[i][j]
            for role in roles:
                sel = [r for r in rows if r["role"] == role]
                ax.plot([r["block"] for r in sel], [r[f"{space}_r{round(e * 100)}"] / min(r["d_in"], r["d_out"])
                                                    for r in sel], marker=".", ms=3, lw=1, label=role)
            ax.set_title(f"{space} space, {e:.0%} energy", fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("effective rank / min(d_in, d_out)")
            if i == 1:
                ax.set_xlabel("block")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
