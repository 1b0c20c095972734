"""Experiment 1 in miniature, read back: S2D on SmolLM2 against AdamW and baselines (bench/exp_smollm2_s2d.py
runs the arms).

A root holds one folder per arm and seed, `<arm>-s<seed>`, each with the stages `finetune` (none for the starting
model, the arm "start"), `quant`, `quant-pt`, `eval`, `diagnose` and optionally `quant-gptq`, each a run folder.
Everything here reads those folders; the settings the text states come from their config.yaml.
"""

from __future__ import annotations

from pathlib import Path

from s2d.experiments.record import Regularizer, Said, activations, flags, hyper, metrics, shared

SCHEMES, METHODS = "W8A8,W6A6,W4A4", "rtn,rotate+rtn,smooth+rtn"
STAGES = ("quant", "quant-pt", "eval", "diagnose")  # an arm is finished when each of these is
HEADLINE = "s2d-decoupled-outliers"  # the S2D arm the second and third runs read everything against
LAMBDA_SWEEP = ("s2d-decoupled-outliers-lam0.5", "s2d-decoupled-outliers", "s2d-decoupled-outliers-lam8")
LEVER_SEED = 0  # the levers compare the arms of this seed


def _ppl(folder: Path, cell: str, stage: str = "quant") -> float | None:
    """Wiki-test perplexity of one quantized cell of an arm; None while a resumable sweep has not reached it."""
    res = (metrics(folder, stage) or {}).get("results", {})
    return res[cell]["eval"]["ppl:wiki@128"]["ppl"] if cell in res else None


def _peak(folder: Path) -> float:
    return metrics(folder, "diagnose")["severity"]["max_abs"]


def _train_seconds(folder: Path, ft: dict | None) -> str:
    """Fine-tuning wall seconds, with the torch thread count where the run recorded it (not the default 2)."""
    if not ft:
        return "0"
    from s2d.runs import recorded_threads

    threads = recorded_threads(folder / "finetune")
    return f"{ft['seconds']:.0f}" + (f" ({threads} thread)" if threads == 1 else "")


def finished(root: Path) -> dict[str, Path]:
    """Arm folders with every stage measured, the starting model first."""
    done = {p.name: p for p in sorted(root.iterdir()) if all((p / s / "metrics.json").is_file() for s in STAGES)}
    return dict(sorted(done.items(), key=lambda kv: not kv[0].startswith("start")))


def steps(arms: dict[str, Path]) -> list[int]:
    """The distinct fine-tuning steps the arms ran, read from their runs (none for the starting model)."""
    return sorted({ft["steps"] for f in arms.values() if (ft := metrics(f, "finetune"))})


def steps_run(arms: dict[str, Path]) -> str:
    """The fine-tuning steps the arms ran, as the text states them ('0' for the starting model alone)."""
    return " / ".join(f"{n:,}" for n in steps(arms)) or "0"


def tuned(arms: dict[str, Path]) -> list[Path]:
    """The finetune run folders of the arms that fine-tuned (all but the starting model)."""
    return [f / "finetune" for f in arms.values() if (f / "finetune" / "config.yaml").is_file()]


def settings(arms: dict[str, Path]) -> dict[str, str]:
    """What every arm ran with, as the text states it: steps, lr, batch and sequence length of the fine-tunes
    (finetune/config.yaml), and the quantized cells' evaluation (quant/config.yaml; the activation granularity
    from the sweep's cells). A setting that differs between arms reads as all its values."""
    quant = [f / "quant" for f in arms.values()]
    return {"steps": steps_run(arms), "lr": shared(tuned(arms), "lr", hyper),
            "batch": shared(tuned(arms), "batch_size"), "seq_len": shared(tuned(arms), "seq_len"),
            "eval_seq_len": shared(quant, "eval_seq_len"), "ppl_tokens": shared(quant, "ppl_tokens", "{:,}".format),
            "activations": activations(quant)}


def arm_options(folder: Path) -> str:
    """The regularizer flags an arm's fine-tune ran with, from its command line."""
    return " ".join(flags(folder / "finetune", ("--reg", "--reg-option")))


def _first_selection(ft: dict | None) -> list[str]:
    """The Linears a run's first S2D refresh selected (the same start model, so the same choice for the same rule);
    none for a run without S2D."""
    return ft["refreshes"][0]["selected"] if ft and ft.get("refreshes") else []


def _own_selection(own: list[str], control: dict[str, dict], arm: dict[str, dict]) -> str:
    """σ₁ max and mean PCDR₁ of the Linears an S2D arm selected at step 0, in its AdamW control and in it (each a
    diagnose's Linears by name): what the decay did to the layers it aimed at, at equal budget."""
    from s2d.report.markdown import fmt

    def stats(lin: dict[str, dict]) -> tuple[float, float]:
        return max(lin[n]["sigma1"] for n in own), sum(lin[n]["pcdr"][0] for n in own) / len(own)

    (s_ctl, p_ctl), (s_arm, p_arm) = stats(control), stats(arm)
    return f"{fmt(s_ctl)} → {fmt(s_arm)}; {p_ctl:.3f} → {p_arm:.3f}"


def table(root: Path) -> str:
    from s2d.report import md_table

    quality, outliers = [], []
    arms = finished(root)
    ft_runs = {name: metrics(folder, "finetune") for name, folder in arms.items()}
    diag = {name: metrics(folder, "diagnose") for name, folder in arms.items()}
    linears = {name: {x["name"]: x for x in d["linears"]} for name, d in diag.items()}
    first = {name: _first_selection(ft) for name, ft in ft_runs.items()}
    sel: list[str] = []  # the union over the S2D arms (the fold control's selection is never decayed)
    for name, names in first.items():
        sel += [n for n in names if name.startswith("s2d") and n not in sel]
    for name, folder in arms.items():
        q = metrics(folder, "quant")["results"]
        ev, d, lin = metrics(folder, "eval")["tasks"], diag[name], linears[name]
        ppl = {k: v["eval"]["ppl:wiki@128"]["ppl"] for k, v in q.items()}
        quality.append([name, ppl["FP"], ppl["W8A8 rtn"], ppl["W6A6 rtn"], ppl["W4A4 rtn"], _per_tensor(folder),
                        ppl["W6A6 rotate+rtn"], ppl["W4A4 rotate+rtn"], ppl["W6A6 smooth+rtn"],
                        ppl["W4A4 smooth+rtn"], ev["polarity"]["acc"], ev["analogy-mc"]["acc"],
                        _train_seconds(folder, ft_runs[name])])
        top = [lin[n] for n in sel if n in lin]
        control = _control(name, arms) if name.startswith("s2d") else None
        outliers.append([name, d["severity"]["max_abs"], d["severity"]["massive_count"], d["severity"]["sigma1_max"],
                         max((x["output"]["max_abs"] for x in top), default=None),
                         max((x["sigma1"] for x in top), default=None),
                         sum(x["pcdr"][0] for x in top) / len(top) if top else None, len(first[name]),
                         _own_selection(first[name], linears[control], lin) if control and first[name] else "-"])
    q_head = ["arm", "FP ppl", "W8A8", "W6A6", "W4A4", "W4A4 per-tensor A", "W6A6 rot", "W4A4 rot", "W6A6 smooth",
              "W4A4 smooth", "polarity (FP)", "analogy (FP)", "train s"]
    with_gptq = {name: f for name, f in arms.items() if metrics(f, "quant-gptq")}
    gptq = [[name, *[_ppl(f, f"{s} gptq", "quant-gptq") for s in SCHEMES.split(",")]]
            for name, f in with_gptq.items()]  # '-': that cell is still to run
    o_head = ["arm", "residual max |x|", "massive entries", "σ₁ max (all)", f"max |x| out of the {len(sel)} "
              "selected", "σ₁ max (selected)", "mean PCDR₁ (selected)", "layers selected at step 0",
              "its own selection: σ₁ max; mean PCDR₁ (AdamW → arm)"]
    parts = [md_table(q_head, quality), md_table(o_head, outliers)]
    if gptq:
        parts.append(f"With GPTQ weights (`--gptq`; {activations([f / 'quant-gptq' for f in with_gptq.values()])} "
                     "activations; '-' marks a cell the resumable stage has not reached yet):\n\n"
                     + md_table(["arm", *[f"{s} GPTQ" for s in SCHEMES.split(",")]], gptq))
    spread = seed_spread(root)
    if spread:
        parts.append("Spread over seeds (mean [min, max]; each seed draws the batches of every arm it names):\n\n"
                     + spread)
    return "\n\n".join(parts)


def seed_spread(root: Path) -> str:
    """Arms run with more than one seed: each headline cell's mean and its range over seeds."""
    from s2d.report import md_table

    by_arm: dict[str, list[Path]] = {}
    for name, folder in finished(root).items():
        by_arm.setdefault(name.rsplit("-s", 1)[0], []).append(folder)
    rows = []
    for arm, folders in by_arm.items():
        if len(folders) < 2:
            continue
        row = [arm, ", ".join(f.name.rsplit("-s", 1)[1] for f in folders)]
        for cell in ("FP", "W4A4 rtn", "W4A4 rotate+rtn", "W6A6 rtn"):
            v = [_ppl(f, cell) for f in folders]
            row.append(f"{sum(v) / len(v):.4g} [{min(v):.4g}, {max(v):.4g}]")
        peaks = [_peak(f) for f in folders]
        row.append(f"{sum(peaks) / len(peaks):.4g} [{min(peaks):.4g}, {max(peaks):.4g}]")
        rows.append(row)
    if not rows:
        return ""
    return md_table(["arm", "seeds", "FP ppl mean [min, max]", "W4A4 RTN", "W4A4 rot", "W6A6 RTN",
                     "residual max |x|"], rows)


def reading(root: Path) -> list[str]:
    """Each fine-tuned arm against plain AdamW of the same seed: FP cost, W4A4 change, and the outliers."""
    from s2d.report.markdown import fmt

    arms = finished(root)
    start = next((f for n, f in arms.items() if n.startswith("start")), None)
    lines = []
    for name, folder in arms.items():
        seed = name.rsplit("-s", 1)[1]
        base = arms.get(f"adamw-s{seed}")
        if name == f"adamw-s{seed}" and start is not None:
            lines.append(f"AdamW alone (seed {seed}): FP ppl {fmt(_ppl(start, 'FP'))} → {fmt(_ppl(folder, 'FP'))}, "
                         f"W4A4 RTN {fmt(_ppl(start, 'W4A4 rtn'))} → {fmt(_ppl(folder, 'W4A4 rtn'))}, residual max |x| "
                         f"{fmt(_peak(start))} → {fmt(_peak(folder))}.")
        if base is None or folder in (base, start):
            continue
        lines.append(f"{name} against AdamW: {against(folder, base)}.")
    return lines


def answers(root: Path) -> list[str]:
    """The issue's three questions answered in plain words from the S2D arms against AdamW of the same seed:
    outliers, W4A4 (RTN, and with rotation or SmoothQuant: does S2D still add anything) and the FP cost,
    counting arms rather than picking one."""
    arms = finished(root)
    pairs = [(n, f, arms[c]) for n, f in arms.items() if n.startswith("s2d") and (c := _control(n, arms))]
    if not pairs:
        return []

    def change(f, base, cell):
        return _ppl(f, cell) / _ppl(base, cell) - 1

    def listed(items):
        return ", ".join(f"{n} {v:+.0%}" for n, v in items)

    peak = [(n, _peak(f) / _peak(b) - 1) for n, f, b in pairs]
    fewer = [(n, v) for n, v in peak if v < -0.05]
    rest = listed([p for p in peak if p not in fewer])
    lines = [f"Does S2D reduce the outliers? In {len(fewer)} of {len(pairs)} S2D runs the residual max |x| fell by "
             f"more than 5% against AdamW of the same seed ({listed(fewer) or 'none'})"
             + (f"; the others moved it by {rest}." if rest else ".")]
    for cell, label in (("W4A4 rtn", "W4A4 with RTN"), ("W4A4 rotate+rtn", "W4A4 with rotation"),
                        ("W4A4 smooth+rtn", "W4A4 with SmoothQuant")):
        ch = [(n, change(f, b, cell)) for n, f, b in pairs]
        better = [(n, v) for n, v in ch if v < 0]
        lines.append(f"Does it make {label} better than AdamW? Lower perplexity in {len(better)} of {len(ch)} runs "
                     f"({listed(better) or 'none'}); every change: {listed(ch)}.")
    fp = [(n, change(f, b, "FP")) for n, f, b in pairs]
    lines.append(f"What does it cost in full precision? FP perplexity against AdamW: {listed(fp)}.")
    lines.append("A change of a few percent is inside AdamW's own seed-to-seed spread (the spread table of the "
                 "two-seed run), so only changes well beyond it count as an effect of S2D.")
    return lines


def _control(name: str, arms: dict[str, Path]) -> str | None:
    """The AdamW arm an S2D arm is judged against: same seed, and the same parametrization (a norm-folded arm
    against AdamW on the folded model, once that control has run; folding alone changes the quantized cells)."""
    seed = name.rsplit("-s", 1)[1]
    control = f"adamw-fold-s{seed}" if "-fold" in name else f"adamw-s{seed}"
    return control if control in arms else None


def against(folder: Path, base: Path) -> str:
    """One arm against another: FP cost, the quantized cells that matter, and the outlier, with changes."""
    from s2d.report.markdown import fmt

    parts = [f"FP ppl {fmt(_ppl(folder, 'FP'))} vs {fmt(_ppl(base, 'FP'))}"]
    for cell, label in (("W4A4 rtn", "W4A4 RTN"), ("W4A4 rotate+rtn", "W4A4 rotation"),
                        ("W4A4 smooth+rtn", "W4A4 SmoothQuant"), ("W6A6 rtn", "W6A6 RTN")):
        parts.append(f"{label} {fmt(_ppl(folder, cell))} vs {fmt(_ppl(base, cell))} "
                     f"({_ppl(folder, cell) / _ppl(base, cell) - 1:+.0%})")
    change = _peak(folder) / _peak(base) - 1
    parts.append(f"residual max |x| {fmt(_peak(folder))} vs {fmt(_peak(base))} ({change:+.0%})")
    return "; ".join(parts)


# Each lever the experiment turns, as (lever, the arm without it `a`, the arm with it `b`): one setting changed.
# The settings in a lever's words are each arm's own, read from its fine-tune (record.Said).
LEVERS = [
    ("selection: τ {a[tau]} over {a[rows]}' PCDR → τ {b[tau]} over {b[rows]}'", "s2d-decoupled",
     "s2d-decoupled-outliers"),
    ("selection: τ {a[tau]} → {b[tau]} over {b[rows]}' PCDR", "s2d-decoupled", "s2d-decoupled-tau0.5"),
    ("selection: τ {a[tau]} → {b[tau]} over {b[rows]}' PCDR", "s2d-decoupled-outliers",
     "s2d-decoupled-outliers-tau0.95"),
    ("form: {a[form]} (λ {a[lam]}) → {b[form]} through Adam (λ {b[lam]})", "s2d-decoupled", "s2d-coupled"),
    ("norm gains folded into the spectra", "s2d-decoupled", "s2d-decoupled-fold"),
    ("norm gains folded, no S2D (the S2D machinery at λ {b[lam]})", "adamw", "adamw-fold"),
    ("S2D on the folded model (λ {a[lam]} → {b[lam]}; the fold alone is the control)", "adamw-fold",
     "s2d-decoupled-fold"),
    ("λ {a[lam]} → {b[lam]}", "s2d-decoupled-outliers", "s2d-decoupled-outliers-lam0.5"),
    ("λ {a[lam]} → {b[lam]}", "s2d-decoupled-outliers", "s2d-decoupled-outliers-lam8"),
    ("S2D → spectral-norm regularization", "s2d-decoupled-outliers", "specnorm"),
    ("S2D → KURE", "s2d-decoupled-outliers", "kure"),
    ("KURE λ {a[lam]} → {b[lam]}", "kure", "kure-lam1"),
]


def levers(root: Path) -> list[str]:
    """Each lever whose two arms finished (seed LEVER_SEED): the arm with it against the arm without it."""
    from s2d.report.markdown import fmt

    arms, s = finished(root), f"-s{LEVER_SEED}"
    lines = [f"{lever.format(a=Said(arms[a + s] / 'finetune'), b=Said(arms[b + s] / 'finetune'))} "
             f"(`{b}` against `{a}`): "
             f"{against(arms[b + s], arms[a + s])}." for lever, a, b in LEVERS if a + s in arms and b + s in arms]
    per_tensor = [f"{name} {fmt(_ppl(f, 'W4A4 rtn'))} → {fmt(_per_tensor(f))}" for name, f in arms.items()
                  if name.endswith(s)]
    if per_tensor:
        lines.append("activation granularity, W4A4 RTN per-token → per-tensor: " + ", ".join(per_tensor) + ".")
    moved = penalties(arms)
    if moved:
        lines.append("did the loss-term regularizers act? Their penalty at the first → last logged step (a term "
                     "that barely moves left the weights to the task loss): " + ", ".join(moved) + ".")
    return lines


def lever_seed(root: Path) -> str:
    """The seed the levers' arms ran with, from their fine-tunes' config.yaml."""
    s = f"-s{LEVER_SEED}"
    return shared([f / "finetune" for n, f in finished(root).items() if n.endswith(s) and (f / "finetune").is_dir()],
                  "seed")


def penalties(arms: dict[str, Path]) -> list[str]:
    """The penalty the coupled regularizers (a loss term) logged, first → last step; decoupled S2D logs none."""
    from s2d.report.markdown import fmt

    out = []
    for name, folder in arms.items():
        history = (metrics(folder, "finetune") or {}).get("history") or []
        first, last = (history[0].get("penalty"), history[-1].get("penalty")) if history else (None, None)
        if first and last is not None:
            out.append(f"{name} {fmt(first)} → {fmt(last)} ({last / first - 1:+.1%})")
    return out


def _per_tensor(folder: Path) -> float:
    res = metrics(folder, "quant-pt")["results"]
    return next(v["eval"]["ppl:wiki@128"]["ppl"] for k, v in res.items() if k != "FP")


def figures(root: Path, out: Path, prefix: str = "exp-smollm2") -> list[tuple[str, str]]:
    """Per-block max|x| by arm, σ over training steps, and the W4A4 gap; returns (file, caption). Files are
    named <prefix>-max.png etc., so two runs of the experiment can sit side by side in one folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from s2d.report.figures import save_figure

    many = plt.get_cmap("tab20").colors  # more arms than the default 10 colours: line plots would repeat one
    arms = finished(root)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    ax.set_prop_cycle(color=many)
    for name, folder in arms.items():
        res = metrics(folder, "diagnose")["residual"]
        ax.plot([r["block"] for r in res], [r["max_abs"] for r in res], marker=".", label=name)
    ax.set(yscale="log", xlabel="block", ylabel="residual max |x|", title="SmolLM2: max |x| per block, by arm")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    made.append((save_figure(fig, out / f"{prefix}-max.png").name, "Residual-stream max |x| per block, by arm"))

    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    ax.set_prop_cycle(color=many)
    for name, folder in arms.items():
        ft = metrics(folder, "finetune")
        if ft:
            ax.plot([h["step"] for h in ft["history"]], [h["sigma_max"] for h in ft["history"]], label=name)
    ax.set(xlabel="step", ylabel="largest σ₁ over all Linears", title="σ₁ over training steps")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    made.append((save_figure(fig, out / f"{prefix}-sigma.png").name, "Largest σ₁ of SmolLM2's Linears over steps"))

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    names = list(arms)
    for i, method in enumerate(("rtn", "rotate+rtn", "smooth+rtn")):
        gaps = []
        for folder in arms.values():
            q = metrics(folder, "quant")["results"]
            gaps.append(q[f"W4A4 {method}"]["eval"]["ppl:wiki@128"]["ppl"] / q["FP"]["eval"]["ppl:wiki@128"]["ppl"])
        ax.bar([j + 0.27 * (i - 1) for j in range(len(names))], gaps, width=0.27, label=method)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set(yscale="log", ylabel="W4A4 ppl / FP ppl", title="The W4A4 gap, by arm and method")
    ax.legend(fontsize=7)
    made.append((save_figure(fig, out / f"{prefix}-w4a4-gap.png").name, "W4A4 perplexity over FP perplexity"))
    sweep = lambda_sweep(root)
    if len(sweep) >= 2:
        fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
        # RTN labels above their points, rotation labels below, so the two series' labels do not overprint.
        for cell, marker, dy in (("W4A4 rtn", "o", 4), ("W4A4 rotate+rtn", "s", -10)):
            xs, ys = [p["fp_cost"] for p in sweep], [p[cell] for p in sweep]
            ax.plot(xs, ys, marker=marker, label=cell)
            for p, x, y in zip(sweep, xs, ys, strict=True):
                ax.annotate(f"λ={p['lam']:g}", (x, y), textcoords="offset points", xytext=(4, dy), fontsize=7)
        ax.axhline(0, color="grey", lw=0.6)
        ax.axvline(0, color="grey", lw=0.6)
        s = Said(arms[f"{sweep[0]['arm']}-s{LEVER_SEED}"] / "finetune")  # the sweep's arms differ in λ alone
        ax.set(xlabel="FP ppl change vs AdamW (%)", ylabel="W4A4 ppl change vs AdamW (%)",
               title=f"λ sweep ({s['form']} S2D, τ {s['tau']} {s['rows'].removeprefix('the ')}): cost vs gain")
        ax.legend(fontsize=7)
        made.append((save_figure(fig, out / f"{prefix}-lambda.png").name,
                     "λ sweep: FP cost against W4A4 change, both relative to AdamW (below 0 = better)"))
    return made


def lambda_sweep(root: Path) -> list[dict]:
    """The λ-sweep arms of seed LEVER_SEED that finished, against AdamW of that seed: FP and W4A4 changes in %,
    each arm's λ read from its fine-tune."""
    arms = finished(root)
    base = arms.get(f"adamw-s{LEVER_SEED}")
    if base is None:
        return []

    points = []
    for name in LAMBDA_SWEEP:
        folder = arms.get(f"{name}-s{LEVER_SEED}")
        if folder:
            points.append({"arm": name, "lam": float(Regularizer(folder / "finetune")["lam"]),
                           "fp_cost": 100 * (_ppl(folder, "FP") / _ppl(base, "FP") - 1),
                           **{c: 100 * (_ppl(folder, c) / _ppl(base, c) - 1) for c in ("W4A4 rtn", "W4A4 rotate+rtn")},
                           "max_abs": _peak(folder)})
    return sorted(points, key=lambda p: p["lam"])
