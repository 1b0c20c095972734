"""Regenerate docs/results.md from finished run folders and bench/out JSON; nothing in it is typed by hand.

Each section quotes the command that produced its numbers (read back from the run's config.yaml) and copies
its figures into docs/figures/ (the folder beside --out). Every setting a section states (learning rate, batch,
tokens, steps, threads, ...) is read from the runs' config.yaml or metrics.json. A run that has not finished
yet, or a run folder that does not record a setting its section states, is listed as missing, never filled in.

Usage: python bench/make_results.py [--runs runs] [--out docs/results.md] [--only SECTION ...]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from s2d.experiments import bias_lowrank as bias_lowrank_exp
from s2d.experiments import lowrank_grid, smollm2, vit, vit_levers, vit_static
from s2d.experiments import minilm as minilm_exp
from s2d.experiments.record import MissingSetting, Said, count, hyper, run_config, shared
from s2d.experiments.smollm2_per_tensor import smollm2_per_tensor
from s2d.experiments.vit_width import vision_width
from s2d.report.markdown import fmt, md_table

# The published S2D results (SigLIP2-B, ImageNet-1k top-1, GPUs), quoted from SPEC §2 as the reference the
# miniature is read against; they are the paper's numbers, printed as such, never as ours.
PAPER_S2D = [["FP", 85.0, 85.0], ["ERQ W4A4", 65.6, 73.0], ["RepQ-ViT W6A6", 58.5, 80.0], ["QAT W4A4", 65.8, 69.7],
             ["QAT W3A4", 59.9, 62.4]]


class Results:
    def __init__(self, runs: Path, figures: Path, bench_out: Path):
        self.runs, self.figures, self.bench_out = runs, figures, bench_out
        self.parts: list[str] = []
        self.headline: list[str] = []  # the subset copied into the README between its results markers
        self.missing: list[str] = []

    def text(self, s: str, headline: bool = False) -> None:
        self.parts.append(s.rstrip() + "\n")
        if headline:
            self.headline.append(s.rstrip() + "\n")

    def command(self, folder: Path, program: str = "s2d") -> str:
        return f"{program} " + " ".join(run_config(folder)["argv"])

    def quote(self, cmd: str, headline: bool = False) -> None:
        self.text(f"```bash\n{cmd}\n```", headline)

    def figure(self, src: Path, name: str, caption: str) -> None:
        self.figures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.figures / name)
        self.text(f"![{caption}](figures/{name})\n\n*{caption}*")

    def load(self, path: Path) -> dict | None:
        if not path.is_file():
            self.missing.append(str(path))
            return None
        return json.loads(path.read_text())


def evaluation(r: Results) -> None:
    r.text("## Evaluation baselines (SmolLM2, fp32)", True)
    m = r.load(r.runs / "eval-smollm2" / "metrics.json")
    if m:
        r.quote(r.command(r.runs / "eval-smollm2"), True)
        rows = []
        for name, v in m["tasks"].items():
            if "ppl" in v:
                rows.append([name, "perplexity", v["ppl"], f"{v['n_tokens']:,} tokens in {v['n_windows']} windows"])
            else:
                rows.append([name, "acc / acc_norm", f"{v['acc']:.4f} / {v['acc_norm']:.4f}",
                             f"{v['n']} examples (chance {v.get('chance', 0):.2f})"])
        r.text(md_table(["task", "metric", "value", "scored on"], rows), True)
    t = r.load(r.bench_out / "eval_throughput.json")
    if t:
        r.text("**Throughput, s2d against lm-eval-harness** (`python bench/eval_throughput.py`, same model, tokens "
               "and windows, arms alternating):")
        r.text(md_table(["arm", "tokens", "tokens/s", "wall s", "process s", "NLL/token"],
                        [[arm, v["tokens"], v["median_tokens_per_s"], v["median_wall_s"], v["median_process_s"],
                          f"{v['nll_mean']:.8f}"] for arm, v in t["summary"].items()]))
        r.text(f"Speed ratio s2d/lm-eval, same rolling windows: {t['ratio_s2d_over_lm_eval']:.3f} (target ≥ 1); "
               f"|NLL/token difference| {t['nll_mean_abs_diff']:.1e}. Model {t['args']['model']}, seq_len "
               f"{t['args']['seq_len']}, batch {t['args']['batch_size']}, median of {t['args']['repeats']} repeats.")


def diagnose(r: Results) -> None:
    r.text("## Diagnose: outliers and the spectrum link")
    for key, label in (("diag-smollm2", "SmolLM2-135M"), ("diag-minilm", "MiniLM-L6")):
        m = r.load(r.runs / key / "metrics.json")
        if not m:
            continue
        r.text(f"### {label}")
        r.quote(r.command(r.runs / key))
        r.text("\n".join(f"> {line}" for line in m["reading"]))
        rows = []
        for scope, preds in m["link"].items():
            for p, name in (("sigma1", "σ₁"), ("pcdr1", "PCDR₁"), ("pcdr3", "PCDR₃")):
                c = preds[p]
                rows.append([scope, name, c["spearman"], c["spearman_p"], c["pearson"], c["pearson_p"], c["n"]])
        r.text(md_table(["Linears", "predictor vs output max|x|", "Spearman ρ", "p", "Pearson r", "p", "n"], rows))
        r.figure(r.runs / key / "figures" / "max_per_block.png", f"{key}-max.png", f"{label}: max|x| per block")
        r.figure(r.runs / key / "figures" / "link_scatter.png", f"{key}-link.png",
                 f"{label}: σ₁ and PCDR₁ vs output max|x|")
    m = r.load(r.runs / "compare-lm" / "metrics.json")
    if m:
        r.text("### Outlier severity across models", True)
        r.quote(r.command(r.runs / "compare-lm"), True)
        rows = [[i + 1, name, *[m["severity"][name][k] for k in ("max_abs", "mean_kurtosis", "massive_count",
                                                                  "sigma1_p50", "sigma1_p99", "sigma1_max")]]
                for i, name in enumerate(m["ranking"])]
        r.text(md_table(["rank", "model", "max |x|", "mean kurtosis", "massive", "σ₁ p50", "σ₁ p99", "σ₁ max"], rows),
               True)
        worst, mild = m["ranking"][0], m["ranking"][-1]
        sw, sm = m["severity"][worst], m["severity"][mild]
        r.text(f"Reading: {worst} has {sw['max_abs'] / sm['max_abs']:.0f}× the peak activation of {mild} "
               f"({fmt(sw['max_abs'])} vs {fmt(sm['max_abs'])}), {sw['massive_count']} massive residual entries "
               f"against {sm['massive_count']}, and a {sw['sigma1_p99'] / sm['sigma1_p99']:.1f}× larger 99th "
               f"percentile of σ₁. Mean kurtosis ranks them the other way ({fmt(sw['mean_kurtosis'])} vs "
               f"{fmt(sm['mean_kurtosis'])}): it averages over Linears, and most of the more heavily trained "
               "model's Linears are tame while a few carry the extreme values. These are two different models "
               "(a decoder LM and a post-norm sentence encoder), not two stages of one pre-training; the "
               "same-model miniature of 'outliers grow with pre-training' is the ViT of Experiment 2 below.",
               True)
    b = r.load(r.bench_out / "diagnose_memory.json")
    if b:
        r.text("**Memory of diagnose** (`python bench/diagnose_memory.py`, each size in a fresh process):")
        r.text(md_table(["samples × tokens", "peak RSS MiB", "RSS after load MiB", "wall s", "cpu s"],
                        [[f"{x['n_samples']} × {x['seq_len']}", x["peak_rss_mib"], x["rss_after_load_mib"],
                          x["wall_s"], x["cpu_s"]] for x in b["runs"]]))
        r.text(f"Peak RSS grows by {b['peak_growth']:+.1%} from the small to the large run (target < +10%).")


def diagnose_speed(r: Results) -> None:
    runs = sorted((r.bench_out / "diagnose_speed").glob("*.json"))
    if not runs:
        r.missing.append(str(r.bench_out / "diagnose_speed"))
        return
    loaded = [(path.stem.rsplit("-", 1)[0], json.loads(path.read_text())) for path in runs]
    targets = {"smollm2-135m": 40.0, "qwen2-0.5b": 180.0}  # issue 22, seconds on 2 cores
    r.text("**Speed of diagnose** at the defaults, both arms in one process on the same calibration batches: exact "
           "= dense SVDs and the old statistics pass, fast = `--spectra fast`. Targets (on 2 cores): SmolLM2 "
           "< 40 s, a 0.5B model < 3 min. No 0.5B checkpoint exists here, so the 0.5B row is a seeded random model "
           "of Qwen2.5-0.5B's exact shape: its times are real, its statistics are not.")
    rows, commands = [], []
    for key, b in loaded:
        worst = max(b["max_rel_diff"].items(), key=lambda kv: kv[1])
        target = targets.get(key)
        met = "-" if target is None or b["threads"] != 2 else ("met" if b["fast"]["wall_s"] < target else "missed")
        rows.append([b["model"], b["threads"], f"{b['config']['n_samples']}×{b['config']['seq_len']}",
                     b["exact"]["wall_s"], b["exact"]["spectra_s"], b["fast"]["wall_s"], b["fast"]["spectra_s"],
                     f"{b['ratio']:.2f}×", f"{b['dense_fallbacks']}/{b['linears']}", f"{worst[1]:.1e} ({worst[0]})",
                     "yes" if b["reading_identical"] else "no", met])
        flag = f"--shape {key}" if "random weights" in b["model"] else f"--model {key}"
        if b.get("order", "exact,fast") != "exact,fast":
            flag += f" --order {b['order']}"
        commands.append(f"OMP_NUM_THREADS={b['threads']} python bench/diagnose_speed.py {flag}")
    r.quote("\n".join(dict.fromkeys(commands)))
    r.text(md_table(["model", "threads", "tokens", "exact s", "exact spectra s", "fast s", "fast spectra s",
                     "speed-up", "dense fallbacks", "largest relative difference", "same reading", "target"], rows))


def inference_speed(r: Results) -> None:
    b = r.load(r.bench_out / "inference_speed.json")
    if not b:
        return
    s = b["settings"]
    r.text("### What low-rank compression buys on a CPU (SmolLM2)", True)
    r.quote("python bench/inference_speed.py --decode-tokens 32", True)
    r.text(f"Batch 1, {s['threads']} thread, each variant in its own process: prefill = one forward over "
           f"{s['prompt']} tokens (median of {s['repeats']}), decode = {s['decode_tokens']} greedy tokens with the KV "
           f"cache after a {s['decode_prompt']}-token prompt (median of {s['decode_repeats']}). Factorized = the "
           "compressed model's two thin Linears; merged = the same factors multiplied back into one dense Linear. "
           f"Dense measured again at the end drifted by {b['drift']['prefill']:+.1%} (prefill) and "
           f"{b['drift']['decode']:+.1%} (decode).", True)
    rows = [[name, v["params"], v["prefill_tok_s"], v["decode_tok_s"], v["prefill_ratio"], v["decode_ratio"],
             v["peak_rss_mb"]] for name, v in b["variants"].items()]
    r.text(md_table(["variant", "parameters", "prefill tok/s", "decode tok/s", "prefill × dense", "decode × dense",
                     "peak RSS MiB"], rows), True)
    r.text("\n".join(f"- {line}" for line in b["reading"].splitlines()), True)


def quantization(r: Results) -> None:
    r.text("## Quantization (SmolLM2)", True)
    r.text("SmolLM2's packaged weights were already 4-bit (Q4_1, group 32): every W4 number below is flattered "
           "by that, since the weights sit on a 4-bit grid already (ASSETS.md).", True)
    r.text("### The method table: RTN, GPTQ, SmoothQuant+GPTQ, rotation+GPTQ", True)
    _sweep(r, r.runs / "quant-table-smollm2", True)
    r.text("### Outlier baselines with RTN weights, and W4A8")
    _sweep(r, r.runs / "quant-sweep-smollm2", False)
    r.text("### Per-tensor activations, and weight-only W4")
    r.text("The same sweep with one activation scale per tensor instead of per token (W4A16 quantizes no "
           "activations, so the granularity does not apply to it).")
    _sweep(r, r.runs / "quant-pertensor-smollm2", False)


def _sweep(r: Results, folder: Path, headline: bool) -> None:
    m = r.load(folder / "metrics.json")
    if not m:
        return
    r.quote(r.command(folder), headline)
    results = m["results"]
    if not m.get("complete", True):
        r.text(f"This sweep was interrupted after {len(results) - 1} cells (empty cells show '-'); rerunning the "
               "same command resumes it.", headline)
    methods = list(dict.fromkeys(k.split(" ", 1)[1] for k in results if k != "FP"))
    schemes = list(dict.fromkeys(k.split(" ", 1)[0] for k in results if k != "FP"))
    for i, task in enumerate(results["FP"]["eval"]):
        key = "ppl" if task.startswith("ppl") else "acc"
        fp = results["FP"]["eval"][task]
        size = f"{fp['n_tokens']:,} tokens" if key == "ppl" else f"{fp['n']} examples"
        r.text(f"**{task}** ({key}, {size})", headline and i == 0)
        rows = [["FP", *[fp[key]] * len(methods)]]
        rows += [[s, *[results[f"{s} {meth}"]["eval"][task][key] if f"{s} {meth}" in results else None
                       for meth in methods]] for s in schemes]
        r.text(md_table(["scheme", *methods], rows), headline and i == 0)
    ppl_task = next(t for t in results["FP"]["eval"] if t.startswith("ppl"))
    ppl = {cell: v["eval"][ppl_task]["ppl"] for cell, v in results.items()}  # "W4A4 rtn" -> perplexity
    by_scheme = {sch: {m: ppl[f"{sch} {m}"] for m in methods if f"{sch} {m}" in ppl} for sch in schemes}
    w4a4 = by_scheme.get("W4A4", {})
    if len(w4a4) > 1:
        best = min(w4a4, key=w4a4.get)
        r.text(f"Reading: at W4A4 the best method is {best} (ppl {fmt(w4a4[best])} against FP {fmt(ppl['FP'])}); "
               f"plain RTN gives {fmt(w4a4.get('rtn'))}.", headline)
    if len(methods) > 1:
        best = [f"{sch}: {(b := min(ms, key=ms.get))} ({fmt(ms[b])})" for sch, ms in by_scheme.items() if ms]
        r.text("Best perplexity per scheme: " + "; ".join(best) + ".", headline)
    if {"rtn", "gptq"} <= set(methods):
        pairs = {sch: (ms["gptq"], ms["rtn"]) for sch, ms in by_scheme.items() if {"gptq", "rtn"} <= set(ms)}
        won = [f"{sch} ({fmt(g)} vs {fmt(t)})" for sch, (g, t) in pairs.items() if g < t]
        lost = [f"{sch} ({fmt(g)} vs {fmt(t)})" for sch, (g, t) in pairs.items() if g >= t]
        r.text(f"GPTQ against RTN, same scheme: lower perplexity at {', '.join(won) or 'no scheme'}; not lower at "
               f"{', '.join(lost) or 'no scheme'}. GPTQ only decides how weights round; where activations are "
               "quantized to few bits, their error dominates, and only the outlier baselines (rotation above all) "
               "reduce it.", headline)
    seconds = {k: v["seconds"] for k, v in results.items() if "seconds" in v}
    if seconds:
        r.text("Quantization time per cell (wall s, including calibration passes, on cores shared with whatever "
               "else ran; the dedicated GPTQ timing is under Speed): "
               + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".")
    if (folder / "figures" / "grid.png").is_file():
        r.figure(folder / "figures" / "grid.png", f"{folder.name}-grid.png", "SmolLM2 perplexity by scheme and "
                 "method")


def quant_speed(r: Results) -> None:
    b = r.load(r.bench_out / "quant_speed.json")
    if b:
        f = b["forward"]
        r.text(f"**Speed** (`python bench/quant_speed.py`): W4A4 fake-quant forward / FP forward = "
               f"{f['ratio']:.2f}× ({f['batch']}×{f['seq_len']} tokens, median of {f['repeats']}; target ≤ 1.5×).")
        if "gptq" in b and "runs" in b["gptq"]:  # float64 (the numerics before gptq_precision) beside float32
            g = b["gptq"]
            runs = {p: rs[0] if isinstance(rs, list) else rs for p, rs in g["runs"].items()}
            arms = "; ".join(f"{p}: {g['median_wall_s'][p]:.0f} s wall, {x['cpu_s']:.0f} s CPU, peak RSS "
                             f"{x['peak_rss_mib']:.0f} MiB, wiki ppl@512 {x['ppl']:.3f} on {x['ppl_tokens']:,} tokens"
                             for p, x in runs.items())
            r.text(f"GPTQ W4 over all {g['layers']} Linears ({g['samples']}×{g['seq_len']} calibration tokens), side "
                   f"by side in one run: {arms}. float64 / float32 wall = {g['ratio_float64_over_float32']:.2f}×"
                   f" (target: float32 < 60 s). float32 against float64 on the same layers: "
                   f"{g['codes_differ_fraction']:.1%} of the integer codes differ; each layer's quantization error "
                   f"on its calibration activations differs by {g['layer_error_rel_diff_median']:+.2%} (median), "
                   f"at most {g['layer_error_rel_diff_max_abs']:.1%}.")


def w4a4_ladder(r: Results) -> None:
    """The W4A4 ladder: one technique per rung, against the issue's target of 1.5× FP."""
    from s2d.experiments.ladder import finished, table

    b = r.load(r.bench_out / "w4a4_ladder.json")
    if not b:
        return
    root, names = r.runs / "w4a4-ladder", list(b["commands"])
    r.text("### The W4A4 ladder: one technique per rung (SmolLM2)", True)
    r.quote("python bench/w4a4_ladder.py", True)
    r.text("Weights per output channel on every rung (weight groups of 32 would re-create the packaged Q4_1 grid "
           "and flatter W4); activations dynamic, per token, or per group of channels within each token where a "
           "rung sets `a_granularity=per_group`. The field's rungs are theirs (Llama-3.2-1B, WikiText-2, SPEC §3), "
           "quoted beside the closest of ours.", True)
    r.text(table(root, names), True)
    cells = finished(root, names)
    lines = []
    for scheme, target in LADDER_TARGETS.items():  # uniform bits only: a mixed-precision rung spends more
        same = {n: c for n, c in cells.items() if c["cell"].split()[0] == scheme
                and not c["config"].get("layer_schemes")}
        if same:
            best = min(same, key=lambda n: same[n]["ratio"])
            c = same[best]
            verdict = "reaches" if c["ratio"] <= target else f"misses by {c['ratio'] - target:.2f}×"
            lines.append(f"- {scheme}: best rung **{best}**, {c['ppl']:.2f} ({c['ratio']:.2f}× FP); target ≤ "
                         f"{target:.2f}×: it {verdict}.")
    mixed = {n: c for n, c in cells.items() if c["config"].get("layer_schemes")}
    for n, c in mixed.items():
        lines.append(f"- mixed precision, {n}: {c['ppl']:.2f} ({c['ratio']:.2f}× FP) with "
                     f"{len(c['config']['layer_schemes'])} Linears raised (not a uniform-bit rung).")
    r.text("\n".join(lines), True)


LADDER_TARGETS = {"W4A4": 1.5, "W4A4KV4": 1.6, "W4A8": 1.10, "W6A6": 1.03}  # the issue's, bench-side


def mixed_precision(r: Results) -> None:
    from s2d.experiments.mixed_precision import table

    b = r.load(r.bench_out / "mixed_precision.json")
    if not b:
        return
    r.text("### Mixed precision: perplexity against average bits (SmolLM2)", True)
    r.quote(b.get("command", "python bench/mixed_precision.py"), True)
    r.text(table(r.runs / "mixed-precision", [float(x) for x in b["commands"]]), True)
    figure = r.bench_out / "mixed_precision.png"
    if figure.is_file():
        r.figure(figure, "mixed_precision.png", "SmolLM2 wiki-test perplexity against average activation bits")


def encoder_w4a4(r: Results) -> None:
    b = r.load(r.bench_out / "encoder_w4a4.json")
    if not b:
        return
    r.text("### W4A4 on the encoder family (all-MiniLM-L6-v2)", True)
    r.quote(b["command"], True)
    r.text(f"Embedding fidelity to FP on {b['sentences']} wiki-test sentences (mean-pooled, cosine; nearest-"
           "neighbour agreement among the sentences). Rotating recipes are refused on this post-norm family:", True)
    r.text("| scheme | method | mean cos | min cos | NN agreement | s |\n|---|---|---|---|---|---|\n" + "\n".join(
        f"| {v['scheme']} | {v['method']} | {v['mean_cosine']:.4f} | {v['min_cosine']:.3f} | "
        f"{v['nn_agreement']:.3f} | {v['seconds']:.0f} |" for v in b["rows"].values()), True)
    r.text("Refused: " + "; ".join(f"`{m}`" for m in b["refused"]) + " (" + next(iter(b["refused"].values()), "")
           + ").", True)


def lowrank(r: Results) -> None:
    r.text("## Low-rank compression (SmolLM2)", True)
    root = r.runs / "lowrank-grid"
    if root.is_dir():
        r.quote("python bench/lowrank_grid.py   # one `s2d compress` per cell; --table reprints this table", True)
        if lowrank_grid.done(root):  # the settings of the cells that ran (none yet: the table says pending)
            g = lowrank_grid.settings(root)
            fewer = f" ({g['fewer']})" if g["fewer"] else ""
            search = (f"; `rom+search` is the perplexity search ({g['search_split']} wiki-validation tokens, "
                      f"tolerance {g['tolerance']} per layer) stopped at the keep target") if g["tolerance"] else ""
            r.text(f"Calibration {g['calibration']} wiki-train tokens; wiki-test ppl@{g['window']} on the first "
                   f"{g['ppl_tokens']} tokens; zero-shot tasks on their first {g['examples']} examples{fewer}"
                   f"{search}. The compress times are wall times of a queue that at times shared the 2 cores with "
                   "other work, at the torch thread count shown (blank: the default, 2): a guide, not a benchmark "
                   "(rom's cost is benchmarked below).", True)
        r.text(lowrank_grid.table(root), True)
        r.text("\n".join(f"- {line}" for line in lowrank_grid.reading(root)), True)
        if any((root / f"{name}-quant" / "metrics.json").is_file() for name in lowrank_grid.QUANTIZED):
            q = lowrank_grid.quant_settings(root)
            r.text(f"**Compressed, then quantized** (`python bench/lowrank_grid.py --quant`; wiki test "
                   f"ppl@{q['window']} on {q['ppl_tokens']} tokens, {q['activations']} activations):")
            r.text(lowrank_grid.quant_table(root))
            r.text("\n".join(f"- {line}" for line in lowrank_grid.quant_reading(root)))
        for cell in ("rom+search-0.8", "rom-0.8"):
            if (root / cell / "figures" / "ranks.png").is_file():
                r.figure(root / cell / "figures" / "ranks.png", f"lowrank-ranks-{cell}.png",
                         f"Ranks per Linear, {cell}")
    r.text("For reference, **the papers' figures (theirs, LLaMA-7B at 80% of the parameters, average zero-shot "
           "accuracy)**: LLM-ROM feature space 65.0 of 70.5 (structured pruning 59.7); SFSD feature space 64.7 "
           "of 69.6, weight SVD 50.4 (SPEC §4).")
    s = r.runs / "lowrank-structure"
    if (s / "metrics.json").is_file():
        from s2d.lowrank.structure import ENERGIES, by_role

        m = json.loads((s / "metrics.json").read_text())
        r.text("### Structure study: which segments are intrinsically low-rank")
        r.quote(r.command(s, "python -m s2d.commands.structure"))
        r.text(f"Effective rank (smallest k holding the energy fraction) over min(d_in, d_out), mean by role; "
               f"feature space on {m['calibration']}.")
        r.text(md_table(["role", "shape (out × in)", *[f"{sp} r{round(e * 100)}" for sp in ("weight", "feature")
                                                      for e in ENERGIES]], by_role(m["linears"])))
        r.figure(s / "figures" / "structure.png", "lowrank-structure.png",
                 "Effective rank at 90/95/99% energy, weight space vs feature space, by role and depth")
        r.text("\n".join(f"- {line}" for line in structure_reading(m["linears"])))
    b = r.load(r.bench_out / "rom_vs_naive.json")
    if b:
        c = b["config"]
        r.text("### rom against a naive rom (all outputs stored, dense `eig`), side by side")
        r.quote(f"python bench/rom_vs_naive.py --repeats {c['repeats']}")
        rows = [[arm, v["wall_s"], v["cpu_s"], v["peak_rss_mb"], v["rss_before_mb"]] for arm, v in b["median"].items()]
        r.text(md_table(["arm (median)", "wall s", "CPU s", "peak RSS MiB", "RSS before compressing MiB"], rows))
        r.text(f"SmolLM2, keep {c['keep']}, {c['n_samples']}×{c['seq_len']} calibration tokens, {c['threads']} "
               "threads, arms alternating in separate processes. naive / s2d: "
               f"wall ×{b['time_ratio_naive_over_s2d']:.2f}, "
               f"CPU ×{b['cpu_ratio_naive_over_s2d']:.2f}, peak RSS ×{b['peak_rss_ratio_naive_over_s2d']:.2f} "
               f"(growth above the loaded model ×{b['peak_rss_growth_ratio']:.2f}); the two models' logits differ by "
               f"at most {b['max_abs_probe_logit_diff']:.2g}. Target: s2d faster and smaller — "
               + ("met." if b["time_ratio_naive_over_s2d"] > 1 and b["peak_rss_ratio_naive_over_s2d"] > 1 else
                  "NOT met."))
    b = r.load(r.bench_out / "lowrank_memory.json")
    if b:
        s_ = b["summary"]
        r.text("### Bounded memory: a 1.1B Llama compressed from disk, block by block")
        r.quote("python bench/lowrank_memory.py")
        r.text(md_table(["model", "safetensors GiB", "calibration", "params before → after", "kept", "wall s",
                         "CPU s", "peak RSS MiB"],
                        [[b["model"], b["safetensors_bytes"] / 2**30, b["calibration"],
                          f"{s_['params_before'] / 1e9:.3f}B → {s_['params_after'] / 1e9:.3f}B", s_["fraction_kept"],
                          b["wall_s"], b["cpu_s"], b["peak_rss_mb"]]]))
        verdict = "met" if b["peak_rss_mb"] * 2**20 < 2.5e9 else "NOT met"
        r.text(f"{b['method']} at keep {b['keep']}, {b['threads']} threads. Target: peak RSS below 2.5 GB — {verdict} "
               f"({b['peak_rss_mb'] * 2**20 / 1e9:.2f} GB).")


def lowrank_search(r: Results) -> None:
    root = r.runs / "lowrank-grid"
    rows = lowrank_grid.search_rows(root)
    if not rows:
        r.missing.append(str(root / "rom+search-*"))
        return
    tolerance = shared(lowrank_grid.done(root, search=True).values(), "lowrank.tolerance", hyper)
    r.text("### Surgical search: where each keep target stopped")
    r.quote("python bench/lowrank_grid.py --only " + " ".join(row[0] for row in rows))
    r.text("The perplexity search walks the Linears from the last block to the first, accepts the smallest "
           f"candidate rank whose search-split perplexity stays within ppl_ref · {tolerance}^(Linears walked), keeps "
           "the layer dense otherwise, and stops once the parameter target is met; the report columns are on the "
           "disjoint wiki test split and the three zero-shot tasks, as in the grid (a cell the grid lists as "
           "pending had not finished when the grid was generated).")
    r.text(md_table(["cell", "target reached", "params kept", "Linears walked", "Linears compressed",
                     "search ppl ref → final", "final limit", "wiki test ppl@128", "mean acc", "compress wall s",
                     "threads"], rows))
    stops = lowrank_grid.search_stops(root)
    if stops:
        r.text("**Surgical search below its reach** (`python bench/lowrank_grid.py --only "
               + " ".join(row[0] for row in rows) + "`):", True)
        r.text("\n".join(f"- {line}" for line in stops), True)
    for name, *_ in rows:
        if (root / name / "figures" / "ranks.png").is_file() and name != "rom+search-0.8":  # 0.8: in the grid
            r.figure(root / name / "figures" / "ranks.png", f"lowrank-ranks-{name}.png", f"Ranks per Linear, {name}")


def structure_reading(rows: list[dict]) -> list[str]:
    """Which roles and depths are low-rank, in which space, from the structure rows."""
    def frac(x, key):
        return x[key] / min(x["d_in"], x["d_out"])

    roles = list(dict.fromkeys(x["role"] for x in rows))
    mean = {(role, sp): sum(frac(x, f"{sp}_r90") for x in rows if x["role"] == role) /
            sum(1 for x in rows if x["role"] == role) for role in roles for sp in ("weight", "feature")}
    order = sorted(roles, key=lambda role: mean[role, "feature"])
    lines = ["At 90% energy, feature space needs " + ", ".join(
        f"{role} {mean[role, 'feature']:.0%}" for role in order) + " of the full rank; weight space " + ", ".join(
        f"{role} {mean[role, 'weight']:.0%}" for role in order) + "."]
    n = max(x["block"] for x in rows) + 1
    for half, sel in (("first", [x for x in rows if x["block"] < n // 2]),
                      ("second", [x for x in rows if x["block"] >= n // 2])):
        feature, weight = (sum(frac(x, f"{sp}_r90") for x in sel) / len(sel) for sp in ("feature", "weight"))
        lines.append(f"Blocks of the {half} half: mean feature r90 {feature:.0%}, weight r90 {weight:.0%}.")
    return lines


def training(r: Results) -> None:
    b = r.load(r.bench_out / "s2d_overhead.json")
    if not b:
        return
    r.text("## S2D's training overhead (SmolLM2)", True)
    r.quote(f"python bench/s2d_overhead.py --steps {b['timed_steps_per_arm']}", True)
    rows = [["AdamW step", b["plain_step_s"]["wall"], b["plain_step_s"]["process"]],
            ["AdamW + S2D step (between refreshes)", b["s2d_step_s"]["wall"], b["s2d_step_s"]["process"]],
            ["S2D refresh (top-K SVD of all Linears + PCDR)", b["refresh_s"]["wall"], b["refresh_s"]["process"]]]
    r.text(md_table(["what", "wall s", "process s"], rows), True)
    share = b["refresh_s"]["wall"] / (b["m"] * b["plain_step_s"]["wall"])
    r.text(f"Batch {b['batch']}×{b['seq_len']} tokens, {b['form']} form, {b['targets']} targeted Linears, "
           f"{b['timed_steps_per_arm']} alternating steps per arm. Per-step overhead {b['per_step_overhead']:+.1%} "
           f"(zero within the noise of the alternating steps); the refresh amortized over m = {b['m']} steps "
           f"costs {share:.1%} of an AdamW step; measured amortized overhead {b['amortized_overhead']:+.1%} "
           "(target ≤ 3%).", True)


def selection(r: Results) -> None:
    b = r.load(r.bench_out / "s2d_selection.json")
    if not b:
        return
    r.text("## Which layers S2D selects (SmolLM2)")
    r.quote("python bench/s2d_selection.py")
    rows = [[x["tau"], x["pcdr_rows"], x["fold_norms"], len(x["selected"]),
             ", ".join(f"{k} {v}" for k, v in sorted(x["by_role"].items())) or "none",
             "yes" if x["writer_selected"] else "no",
             x["writer_pcdr"][0] if x["writer_pcdr"] else None] for x in b["settings"]]
    r.text(md_table(["τ", "PCDR rows", "norms folded", "layers selected", "by role",
                     "block 11 down_proj selected", "its PCDR₁"], rows))
    r.text(f"One refresh on {b['batch']}; PCDR is taken at each row's largest output neuron and averaged over all "
           "rows, or over the 1% of rows with the largest output ('outliers').")


def experiments(r: Results) -> None:
    smollm2_experiment(r, "exp-smollm2", "## Experiment 1 in miniature: S2D on SmolLM2", headline=True)


LEVERS_ROOT, STEPS_ROOT = "exp-smollm2-levers", "exp-smollm2-steps300"  # the second and third SmolLM2 runs


def _finished(r: Results, root_name: str) -> dict[str, Path] | None:
    """The finished arms of one run of the SmolLM2 experiment; None (and listed as missing) while it has none."""
    root = r.runs / root_name
    done = smollm2.finished(root) if root.is_dir() else {}
    if not done:
        r.missing.append(str(root))
        return None
    return done


def _arm(arms: dict[str, Path], name: str) -> Path:
    """The folder of an arm the text reads a setting from."""
    if name not in arms:
        raise MissingSetting(f"no finished arm {name} to read its settings from (have {', '.join(arms)})")
    return arms[name]


def _threads(arms: dict[str, Path]) -> str:
    """The torch threads the arms' fine-tunes ran on, in words, from their config.yaml."""
    from s2d.runs import recorded_threads

    threads = {recorded_threads(f) for f in smollm2.tuned(arms)}
    if not threads or None in threads:
        raise MissingSetting("a fine-tune's config.yaml records no threads")
    return " / ".join(count(t) for t in sorted(threads)) + " torch thread" + ("" if threads == {1} else "s")


def _times(longer: list[int], shorter: list[int]) -> str:
    """How many times as many steps, in words (twice, three times)."""
    if len(longer) != 1 or len(shorter) != 1:
        raise MissingSetting(f"the arms of a run differ in steps ({longer} against {shorter})")
    ratio = longer[0] / shorter[0]
    return "twice" if ratio == 2 else f"{count(int(ratio))} times" if ratio.is_integer() else f"{ratio:g} times"


def experiments_levers(r: Results) -> None:
    arms = _finished(r, LEVERS_ROOT)
    if arms is None:
        return
    seed = smollm2.lever_seed(r.runs / LEVERS_ROOT)
    rules = [Said(_arm(arms, f"{name}-s{smollm2.LEVER_SEED}") / "finetune")
             for name in ("s2d-decoupled-tau0.5", "s2d-decoupled-outliers-tau0.95")]
    smollm2_experiment(r, LEVERS_ROOT, f"## Experiment 1, second run: every lever at seed {seed}",
                       intro="A second run of the same script into its own root, with the arms the first run had not "
                             "reached (coupled S2D, norm folding with its control — AdamW on the folded model —, the λ "
                             "sweep, spectral-norm regularization, KURE at two λ, two more S2D selection rules: "
                             + " and ".join(f"τ {x['tau']} over {x['rows']}" for x in rules)
                             + ") beside the baselines they are read against (AdamW, and the two decoupled S2D "
                             "selections) rerun with the same seed, so that every comparison below is between "
                             f"folders of this run. Each arm ran on {_threads(arms)}, two arms at a time.",
                       brief=True, not_varied="here steps (the third run's lever) and targets were"
                       if (r.runs / STEPS_ROOT).is_dir() else "steps and targets were")


def experiments_steps(r: Results) -> None:
    after = _finished(r, STEPS_ROOT)
    if after is None:
        return
    short = r.runs / LEVERS_ROOT
    before = smollm2.finished(short) if short.is_dir() else {}
    if not before:
        raise MissingSetting(f"{short}, the second run the third is read against, has no finished arm")
    n_before, n_after = smollm2.steps_run(before), smollm2.steps_run(after)
    h0, h = (Said(_arm(arms, f"{smollm2.HEADLINE}-s{smollm2.LEVER_SEED}") / "finetune") for arms in (before, after))
    steps = smollm2.steps(after)
    smollm2_experiment(r, STEPS_ROOT, f"## Experiment 1, third run: {n_after} steps instead of {n_before}",
                       intro=f"The steps lever: AdamW and the headline S2D arm (τ {h['tau']} over {h['rows']}, λ "
                             f"{h['lam']}) fine-tuned {_times(steps, smollm2.steps(before))} as long, everything else "
                             f"as in the second run (so the lr schedule stretches over {n_after} steps and S2D "
                             f"refreshes {h['refreshes']} times instead of {h0['refreshes']}).",
                       brief=True, args=f"--steps {' '.join(map(str, steps))} --arms "
                                        + " ".join(dict.fromkeys(n.rsplit("-s", 1)[0] for n in after)),
                       not_varied="steps are varied against the second run (below); targets were")
    lines = [f"`{name}`, {n_before} → {n_after} steps: {smollm2.against(after[name], before[name])}."
             for name in after if name in before]
    if lines:
        r.text(f"Each arm at {n_after} steps against itself at {n_before} (the second run's folder):", True)
        r.text("\n".join(f"- {line}" for line in lines), True)


def smollm2_experiment(r: Results, root_name: str, title: str, intro: str = "", headline: bool = False,
                       brief: bool = False, args: str = "", not_varied: str = "steps and targets were") -> None:
    """One run of the SmolLM2 experiment. headline: all of it goes to the README too; brief: only its title,
    command, plain answers and levers do."""
    done = _finished(r, root_name)
    if done is None:
        return
    root = r.runs / root_name
    s = smollm2.settings(done)
    r.text(title, headline or brief)
    root_arg = "" if root_name == "exp-smollm2" else f" --root runs/{root_name}"
    r.quote(f"python bench/exp_smollm2_s2d.py{root_arg}{' ' + args if args else ''}"
            "   # --table reprints the tables, --figures DIR redraws the figures", headline or brief)
    if intro:
        r.text(intro)
    r.text(f"Every arm: {s['steps']} steps of AdamW at lr {s['lr']}, batch {s['batch']}×{s['seq_len']} wiki-train "
           "tokens, the seed in its name (`-s0`, `-s1`; every arm starts from the same pre-trained model, so the seed "
           "draws which wiki-train windows make the batches); quantized cells score wiki-test "
           f"ppl@{s['eval_seq_len']} on {s['ppl_tokens']} tokens ({s['activations']} activations unless marked). "
           "Arm options: " + "; ".join(f"`{n}`: `{smollm2.arm_options(f)}`" for n, f in done.items()
                                       if (f / "finetune" / "config.yaml").is_file()) + ".", headline)
    r.text(smollm2.table(root), headline)
    r.text("\n".join(f"- {line}" for line in smollm2.reading(root)), headline)
    answers = smollm2.answers(root)
    if answers:
        r.text("**In plain words** (counted over every S2D run in this table, each against AdamW of its seed; "
               "a norm-folded S2D run against AdamW on the folded model, since folding alone moves the quantized "
               "cells):",
               headline or brief)
        r.text("\n".join(f"- {line}" for line in answers), headline or brief)
    levers = smollm2.levers(root)
    if levers:
        r.text(f"**Levers**, one setting changed at a time (seed {smollm2.lever_seed(root)}; every arm {s['steps']} "
               "steps, every Linear eligible, the selection rule decides which are decayed; "
               f"{not_varied} not varied):", brief)
        r.text("\n".join(f"- {line}" for line in levers), brief)
    if headline:
        r.text("For reference, **the paper's figures (theirs, not measured here)**: SigLIP2-B on ImageNet-1k top-1, "
               "AdamW vs AdamW+S2D, quoted from SPEC §2:")
        r.text(md_table(["setting (paper)", "AdamW", "AdamW+S2D"], PAPER_S2D))
    for file, caption in smollm2.figures(root, r.figures, prefix=root_name):
        r.text(f"![{caption}](figures/{file})\n\n*{caption}*")


def vision(r: Results) -> None:
    root = r.runs / "exp-vit"
    if not (root / "pretrain-long" / "ptq.json").is_file():
        r.missing.append(str(root))
        return
    s = vit.settings(root)

    def epochs(n: str) -> str:
        return f"{n} epoch" if n == "1" else f"{n} epochs"

    r.text("## Experiment 2 in miniature: a ViT pre-trained here on Fashion-MNIST", True)
    r.quote("python bench/exp_vit.py   # --table reprints the table", True)
    qat = f"; QAT trains with {s['qat']} fake quantization and is scored as its saved integer model" if s["qat"] else ""
    r.text(f"Pre-training from a seeded random ViT ({s['blocks']} blocks, d={s['width']}, {s['patch']}×{s['patch']} "
           f"patches), batch {s['batch']}: `pretrain-short` is {epochs(s['short'])}, `pretrain-long` {s['long']}; the "
           f"fine-tunes start from `pretrain-long` under a new learning rate for {epochs(s['fine-tune'])}, with the "
           f"seed in the arm's name drawing the batches. Accuracy on the {s['test']} test images; PTQ is RTN with "
           f"per-channel weights and per-token activations{qat}.", True)
    sel = root / "selection.json"
    if sel.is_file():
        chosen = json.loads(sel.read_text())
        r.text(f"S2D's τ, chosen on `pretrain-long` before any fine-tune as the largest of "
               f"[{', '.join(chosen['selected'])}] that selects a Linear (PCDR over the outlier rows, one training "
               "batch; if none does, S2D decays the top components of every Linear): the S2D arms ran with "
               f"`{chosen['reg_option']}`. Linears selected per τ: "
               + ", ".join(f"{t}: {len(n)}" for t, n in chosen["selected"].items())
               + f"; the largest PCDR₁ of any Linear was {chosen['max_pcdr1']:.3f}.")
    r.text(vit.table(root), True)
    r.text("\n".join(f"- {line}" for line in vit.reading(root)), True)
    for file, caption in vit.figures(root, r.figures):
        r.text(f"![{caption}](figures/{file})\n\n*{caption}*")
    compare = root / "compare"
    if (compare / "metrics.json").is_file():
        sev = json.loads((compare / "metrics.json").read_text())["severity"]
        rows = [[Path(name).parent.name, v["max_abs"], v["mean_kurtosis"], v["massive_count"], v["sigma1_max"]]
                for name, v in sev.items()]
        r.text("Outlier severity, short against long pre-training (`s2d compare`):")
        r.text(md_table(["checkpoint", "max |x|", "mean kurtosis", "massive entries", "σ₁ max"], rows))
        if (compare / "figures" / "compare.png").is_file():
            r.figure(compare / "figures" / "compare.png", "exp-vit-compare.png",
                     f"ViT outlier severity after {s['short']} and after {s['long']} epochs of pre-training")


def minilm(r: Results) -> None:
    root = r.runs / "exp-minilm"
    b = minilm_exp.summary(root) if root.is_dir() else {"arms": {}}
    if not b["arms"]:
        r.missing.append(str(root))
        return
    s = minilm_exp.settings(root)
    if len(s["held_out"]) != 1:
        raise MissingSetting(f"the runs in {root} hold out different numbers of sentences ({s['held_out']})")
    n = s["held_out"][0]

    def said(arm: str) -> str:
        if arm not in s["s2d"]:
            raise MissingSetting(f"{root} has no finished {arm} run to read its setting from")
        x = s["s2d"][arm]
        return f"{x['form']}, λ {x['lam']}, τ {x['tau']} over {x['rows']}"

    r.text("## Experiment 3, smoke level: MiniLM on polarity, AdamW against S2D")
    r.quote(minilm_exp.command(s))
    r.text(f"{' / '.join(map(str, s['steps']))} steps at lr {' / '.join(map(str, s['lr']))}, batch {s['batch']}; 160 "
           f"training and {n} held-out sentences per seed (the seed draws the split). Mean over seeds ± the 95% "
           "t-interval half-width, then the pooled accuracy over every seed's held-out sentences with its 95% Wilson "
           "interval; the last rows are each S2D arm's paired difference from AdamW (same seed: same split, "
           f"initialization and batches). `s2d` is the paper's setting ({said('s2d')}); `s2d-decoupled` the setting "
           f"that moved SmolLM2's outliers ({said('s2d-decoupled')}). With {n} sentences per seed, one sentence is "
           f"{100 / n:g} points.")
    r.text(minilm_exp.table(b))
    r.text("\n".join(f"- {line}" for line in minilm_exp.reading(b)))
    path = minilm_exp.figure(b, r.figures / "exp-minilm-polarity.png", str(n))
    r.text(f"![MiniLM on polarity, per seed](figures/{path.name})\n\n*MiniLM on polarity: per-seed held-out "
           "accuracy (dots), mean and 95% t-interval (bars)*")


def bias_lowrank(r: Results) -> None:
    """Issue 23: the surgical-decomposition study's claim that low-rank approximation can rectify LLM biases."""
    root = r.runs / "bias-lowrank"
    if "dense" not in bias_lowrank_exp.done(root):
        r.missing.append(str(root / "dense"))
        return
    s = bias_lowrank_exp.settings(root)
    r.text("## Does low-rank compression rectify bias? (SmolLM2)", True)
    r.quote("python bench/bias_lowrank.py   # one run folder per cell; --table reprints the tables and verdict", True)
    r.text(bias_lowrank_exp.intro(s))
    r.text(bias_lowrank_exp.table(root), True)
    r.text("\n".join(f"- {line}" for line in bias_lowrank_exp.verdict(root)), True)
    path = bias_lowrank_exp.figure(root, r.figures / "bias-lowrank.png")
    if path is not None:
        r.text(f"![Bias scores against perplexity](figures/{path.name})\n\n*StereoSet SS − 50, ICAT and CrowS-Pairs "
               "pct_stereotype − 50 against wiki test perplexity for every model, each with its own bootstrap 95% "
               "interval*")


def bias_speed(r: Results) -> None:
    """Issue 23's speed target: the whole bias suite on SmolLM2 in < 10 min on 2 cores."""
    runs = [b for name in ("bias_speed.json", "bias_speed_compare.json") if (b := r.load(r.bench_out / name))]
    if not runs:
        return
    r.text("### Speed of the bias suite (SmolLM2)")
    for b in runs:
        compare = "plain_cpu_s" in next(iter(b["tasks"].values()))
        limit = f" --limit {b['limit']}" if b["limit"] else ""
        out = "" if not compare else " --out bench/out/bias_speed_compare.json"
        r.quote(f"OMP_NUM_THREADS={b['threads']} python bench/bias_speed.py{limit}{' --compare' if compare else ''}"
                f"{out}")
        head = ["task", "items", "scoring", "wall s", "CPU s"]
        rows = []
        for name, t in b["tasks"].items():
            row = [name, f"{t['items']}/{t['items_in_task']}", t["scoring"], t["wall_s"], t["cpu_s"]]
            if compare:
                row += [t["plain_cpu_s"], f"{t['speedup_cpu']:.2f}×", f"{t['max_abs_ll_diff']:.1e}"]
            rows.append(row)
        if compare:
            head += ["plain CPU s", "shared-prefix speed-up (CPU)", "max |Δ log-likelihood|"]
        r.text(md_table(head, rows))
        verdict = "within" if b["within_target"] else "over"
        r.text(f"Whole suite ({b['basis']}): {b['total_wall_s']:.0f} s wall, {b['total_cpu_s']:.0f} s CPU at "
               f"{b['threads']} thread(s); the target is {b['target_s']} s wall on 2 cores: {verdict} it.")


def vision_static(r: Results) -> None:
    root = r.runs / "exp-vit-static"
    if not (root / "pretrain-long" / "ptq.json").is_file():
        r.missing.append(str(root))
        return
    s = vit_static.settings(root)
    r.text("## Experiment 2, per-tensor static: a deeper ViT, AdamW against AdamW+S2D", True)
    r.quote(f"{s['command']}   # --table reprints the table", True)
    r.text(vit_static.intro(s), True)
    sel = root / "selection.json"
    if sel.is_file():
        r.text(f"S2D ran with `{json.loads(sel.read_text())['reg_option']}`, chosen on `pretrain-long` before any "
               f"S2D run (the rule of Experiment 2 in miniature above). {vit_static.selections(root)}")
    r.text(vit_static.table(root), True)
    r.text("\n".join(f"- {line}" for line in vit_static.notes(root)), True)
    r.text("The two pre-trainings' final models (one run each):")
    r.text(vit_static.pretrain_table(root))
    r.text("Along each pre-training, at every kept checkpoint (max |x| on the calibration images):")
    r.text(vit_static.curve_table(root))
    path = vit_static.figure(root, r.figures / "exp-vit-static-curve.png")
    if path is not None:
        r.text(f"![max |x| and the per-tensor static gap over pre-training](figures/{path.name})\n\n*ViT "
               "pre-training, AdamW and AdamW+S2D: max |x| (left) and the accuracy lost to per-tensor static PTQ "
               "(right) against steps*")


def vision_static_levers(r: Results) -> None:
    root = r.runs / "exp-vit-static"
    if not vit_levers.arm_names(root):
        r.missing.append(str(root / "lever-*"))
        return
    command = vit_static.plan(root).get("lever_command")
    if command is None:
        raise MissingSetting(f"{root / 'plan.json'} records no lever_command (the --levers run writes it)")
    r.text("## Experiment 2, per-tensor static: the levers of the S2D fine-tune", True)
    r.quote(command, True)
    r.text(vit_levers.intro(root), True)
    r.text(vit_levers.table(root), True)
    r.text("\n".join(f"- {line}" for line in vit_levers.reading(root)), True)


SECTIONS = (evaluation, diagnose, diagnose_speed, quantization, quant_speed, w4a4_ladder, mixed_precision, encoder_w4a4,
            training, selection, experiments, experiments_levers, experiments_steps, smollm2_per_tensor, vision,
            vision_static, vision_static_levers, vision_width, minilm, lowrank, inference_speed, lowrank_search,
            bias_lowrank, bias_speed)
MARK = "<!-- section:{} -->"


def previous_sections(text: str) -> dict[str, str]:
    """The sections of an earlier results.md (or README results block) by name, from the markers main() writes."""
    chunks = re.split(r"<!-- section:(\w+) -->\n", text)
    return dict(zip(chunks[1::2], chunks[2::2], strict=True))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"), help="figures go to figures/ beside it")
    ap.add_argument("--bench-out", type=Path, default=Path("bench/out"), help="the JSON the benchmarks wrote")
    ap.add_argument("--readme", type=Path, default=Path("README.md"), help="the README whose results block is "
                    "rewritten")
    ap.add_argument("--only", nargs="+", choices=[f.__name__ for f in SECTIONS],
                    help="regenerate only these sections and keep the others as they are in --out and in the "
                         "README (for a checkout that holds only some of the run folders)")
    args = ap.parse_args(argv)
    old = previous_sections(args.out.read_text()) if args.out.is_file() else {}
    if args.only and not old:
        raise SystemExit(f"--only needs an earlier {args.out} with section markers; run without --only first")
    r = Results(args.runs, args.out.parent / "figures", args.bench_out)
    r.text("# Results\n\nGenerated by `python bench/make_results.py` from the run folders named below; every "
           "number comes from the command quoted beside it. Machine: 2 CPU cores, no GPU.")
    heads: dict[str, str] = {}  # section -> its README part
    for section in SECTIONS:
        name = section.__name__
        if args.only and name not in args.only:
            if name in old:
                r.parts.append(MARK.format(name) + "\n" + old[name].rstrip("\n") + "\n")
            continue
        before, before_head = len(r.parts), len(r.headline)
        try:
            section(r)
        except MissingSetting as err:  # the section is left out whole, and says why
            del r.parts[before:], r.headline[before_head:]
            r.missing.append(f"{name}: {err}")
            print(f"section {name} left out: {err}", file=sys.stderr)
        if len(r.parts) > before:
            r.parts.insert(before, MARK.format(name))
        if len(r.headline) > before_head:
            heads[name] = "\n".join(part.replace("## ", "### ", 1) if part.startswith("## ") else part
                                    for part in r.headline[before_head:])
    if r.missing and not args.only:
        r.text("## Not yet run\n\n" + "\n".join(f"- `{m}`" for m in r.missing))
    from s2d.io import atomic_write_text

    atomic_write_text(args.out, "\n".join(r.parts))
    write_readme(args.readme, heads, args.only)
    print(f"wrote {args.out} ({len(r.missing)} inputs missing{': ' + ', '.join(r.missing) if r.missing else ''})")


def write_readme(readme: Path, heads: dict[str, str], only: list[str] | None) -> None:
    """Replace the README's results block with the sections' headline parts; with --only, replace just those
    sections and keep the others as the block holds them."""
    from s2d.io import atomic_write_text

    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    block, tail = rest.split(end, 1)
    note = "All tables, figures and readings: [docs/results.md](docs/results.md).\n"
    if only:
        old = previous_sections(block.replace(note, ""))
        if not old:
            print("README results block has no section markers: left alone (run without --only to rebuild it)")
            return
        source = {f.__name__: heads if f.__name__ in only else old for f in SECTIONS}
        heads = {name: part[name] for name, part in source.items() if name in part}
    body = "".join(MARK.format(name) + "\n" + part.rstrip("\n") + "\n\n" for name, part in heads.items())
    atomic_write_text(readme, f"{head}{start}\n{body}{note}{end}{tail}")


if __name__ == "__main__":
    main()
