"""`s2d run RECIPE.yaml`: the stages of a recipe, each an ordinary run folder, resumable, with one report.

Layout of the run folder DIR:
- `DIR/NN-<stage>[-<swept values>]/`: the run folder of stage NN, written by that subcommand's `run_*`;
  a stage reads the `model/` folder of the last model stage before it (finetune, compress, quantize);
- `DIR/state/<folder>.json`: the stage's key (a hash of its resolved config and of its input's key), its
  status (running, done) and wall time; `DIR/state/<folder>.lock` is held while a process runs the stage;
- `DIR/evaluate/<row>/`: with the recipe's `evaluate:`, the same `s2d eval` run folder for every model the
  recipe made (the input, each finetune/compress/quantize model, an export's GGUF file), keyed like a stage;
- `DIR/recipe.yaml` (resolved), `DIR/run.log`, `DIR/table.json`/`table.md` (one row per cell), and
  `DIR/report.md`/`report.html` with `figures/`.

Rerunning skips a stage whose state says done with the same key; a stage left running resumes (finetune,
quantize) or restarts (the others); a stage whose key changed is rerun, and since each key includes the key
before it, so is every stage after it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from s2d.commands.recipe import MODEL_STAGES, Cell, Recipe, Stage, load_recipe, model_identity, stage_key
from s2d.errors import S2DError
from s2d.io import atomic_write_json, atomic_write_text, ensure_writable_dir

RESUMABLE = ("finetune", "quantize")


@dataclass
class Planned:
    stage: Stage
    folder: str
    key: str
    input: str  # the model spec or folder the stage reads
    input_row: str  # the folder name of the model row it reads ("input" for the recipe's model)


@dataclass
class Evaluation:
    """The recipe's shared evaluation of one model row."""

    row: str  # the model row it scores ("input" or the folder of the stage that made the model)
    model: str  # what `s2d eval` loads: a spec, a model folder or a GGUF file
    key: str

    @property
    def folder(self) -> str:
        return f"evaluate/{self.row}"

    @property
    def state_name(self) -> str:
        return f"evaluate-{self.row}"


def parse_worker(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    k, sep, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        k = n = -1
    if not sep or n < 1 or not 0 <= k < n:
        raise S2DError(f"--worker takes K/N with 0 ≤ K < N, e.g. --worker 0/2; got {text!r}")
    return k, n


def plan(recipe: Recipe, out: Path) -> list[list[Planned]]:
    """Each cell's stages with their folders, keys and inputs; cells sharing a prefix share its folders."""
    cells = []
    for cell in recipe.cells:
        steps, key, model, row = [], model_identity(recipe.model), recipe.model, "input"
        for stage in cell.stages:
            label = cell.label(stage.index)
            folder = f"{stage.index:02d}-{stage.kind}" + (f"-{label}" if label else "")
            key = stage_key(stage, key)
            steps.append(Planned(stage, folder, key, model, row))
            if stage.kind in MODEL_STAGES:
                model, row = str(out / folder / "model"), folder
        cells.append(steps)
    return cells


def plan_evaluations(recipe: Recipe, cells: list[list[Planned]], out: Path) -> list[list[Evaluation]]:
    """Per cell, the shared evaluation of every model row it makes (the input's first); empty without evaluate."""
    if recipe.evaluate is None:
        return [[] for _ in cells]
    import hashlib

    def key(model_key: str) -> str:
        blob = json.dumps({"evaluate": recipe.evaluate.to_dict(), "model": model_key}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    from s2d.commands.export import FILE

    first = Evaluation("input", recipe.model, key(model_identity(recipe.model)))
    out_cells = []
    for steps in cells:
        evals = [first]
        for step in steps:
            if step.stage.kind == "export":
                evals.append(Evaluation(step.folder, str(out / step.folder / FILE), key(step.key)))
            elif step.stage.kind in MODEL_STAGES:
                evals.append(Evaluation(step.folder, str(out / step.folder / "model"), key(step.key)))
        out_cells.append(evals)
    return out_cells


def run_recipe(recipe_path: str | Path, out: str | Path | None = None, worker: str | None = None,
               table_only: bool = False, argv: list[str] | None = None) -> dict:
    """Run (or, with table_only, only tabulate) the recipe into `out`; returns the table and what ran."""
    recipe = load_recipe(recipe_path)  # every stage validated before anything is written
    k, n = parse_worker(worker)
    out = Path(out) if out is not None else Path("runs") / f"run-{Path(recipe_path).stem}"
    if table_only and not (out / "state").is_dir():
        raise S2DError(f"{out} holds no `s2d run` of this recipe: run it first (--table only tabulates)")
    ensure_writable_dir(out)
    (out / "state").mkdir(exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
    cells = plan(recipe, out)
    evaluations = plan_evaluations(recipe, cells, out)
    events = []
    if not table_only:
        for cell, steps, evals in zip(recipe.cells, cells, evaluations, strict=True):
            if cell.index % n != k:
                continue
            for step in steps:
                events.append(_execute(step, out, recipe))
            for evaluation in evals:
                events.append(_evaluate(evaluation, out, recipe))
    table = None
    pending = [s.folder for steps in cells for s in steps if not _done(out, s)]
    pending += [e.folder for evals in evaluations for e in evals if not _evaluated(out, e)]
    if not pending:
        table = write_table(recipe, cells, out, argv, evaluations)
    elif table_only:
        raise S2DError(f"{out}: {len(set(pending))} stage(s) not finished yet ({', '.join(sorted(set(pending))[:4])}"
                       "); run the recipe (or the remaining --worker) first")
    return {"out": out, "events": events, "table": table, "pending": sorted(set(pending))}


# -- one stage -------------------------------------------------------------------------------------------------

def _state(out: Path, folder: str) -> dict | None:
    path = out / "state" / f"{folder}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _done(out: Path, step: Planned) -> bool:
    state = _state(out, step.folder)
    return bool(state and state.get("status") == "done" and state.get("key") == step.key
                and (out / step.folder / "metrics.json").is_file())


@contextlib.contextmanager
def _stage_lock(out: Path, folder: str):
    """Held while a process checks and runs a stage: another worker needing it waits, then reuses it."""
    import fcntl

    with open(out / "state" / f"{folder}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log(out: Path, text: str) -> None:
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    with open(out / "run.log", "a") as f:
        f.write(f"{stamp} {text}\n")


def _execute(step: Planned, out: Path, recipe: Recipe) -> dict:
    with _stage_lock(out, step.folder):
        if _done(out, step):
            _log(out, f"{step.folder}: skipped (finished, same config and input)")
            return {"folder": step.folder, "action": "skipped"}
        state, path = _state(out, step.folder), out / step.folder
        filled = path.is_dir() and any(e.name != ".s2d.lock" for e in path.iterdir())
        same = bool(state and state.get("key") == step.key)
        if filled and same and state.get("status") == "running" and step.stage.kind in RESUMABLE:
            mode = "resume"
        else:
            mode = "overwrite" if filled else "new"
        record = {"folder": step.folder, "stage": step.stage.kind, "index": step.stage.index, "key": step.key,
                  "input": step.input, "resolved": step.stage.resolved(), "mode": mode}
        _recorded(out, step.folder, record, f"running (mode {mode}) on {step.input}",
                  lambda: run_stage(step.stage, step.input, path, mode, recipe.trust_remote_code))
        return {"folder": step.folder, "action": "ran", "mode": mode}


def _recorded(out: Path, state_name: str, record: dict, what: str, work) -> None:
    """Run `work()` with its state file saying running, then done with its wall time; run.log tells each step."""
    name = record["folder"]
    record.update(status="running", started=_dt.datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(out / "state" / f"{state_name}.json", record)
    _log(out, f"{name}: {what}")
    t0 = time.perf_counter()
    try:
        work()
    except BaseException as err:
        _log(out, f"{name}: failed after {time.perf_counter() - t0:.1f} s: {type(err).__name__}: {err}")
        raise
    record.update(status="done", seconds=round(time.perf_counter() - t0, 3),
                  finished=_dt.datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(out / "state" / f"{state_name}.json", record)
    _log(out, f"{name}: done in {record['seconds']:.1f} s")


def _evaluated(out: Path, evaluation: Evaluation) -> bool:
    state = _state(out, evaluation.state_name)
    return bool(state and state.get("status") == "done" and state.get("key") == evaluation.key
                and (out / evaluation.folder / "metrics.json").is_file())


def _evaluate(evaluation: Evaluation, out: Path, recipe: Recipe) -> dict:
    """The shared evaluation of one model, skipped when done with the same key (cells share the input's)."""
    from s2d.commands.eval import run_eval

    name = evaluation.folder
    with _stage_lock(out, evaluation.state_name):
        if _evaluated(out, evaluation):
            return {"folder": name, "action": "skipped"}
        path = out / name
        mode = "overwrite" if path.is_dir() and any(path.iterdir()) else "new"
        path.parent.mkdir(exist_ok=True)
        record = {"folder": name, "stage": "evaluate", "key": evaluation.key, "input": evaluation.model}
        _recorded(out, evaluation.state_name, record, f"evaluating {evaluation.model}",
                  lambda: run_eval(evaluation.model, recipe.evaluate, path,
                                   trust_remote_code=recipe.trust_remote_code, mode=mode))
        return {"folder": name, "action": "ran", "mode": mode}


def run_stage(stage: Stage, model: str, path: Path, mode: str, trust_remote_code: bool = False) -> None:
    """Call the stage's subcommand on `model`, writing its ordinary run folder `path`."""
    common = {"trust_remote_code": trust_remote_code, "mode": mode}
    if stage.kind == "finetune":
        from s2d.commands.finetune import finetune

        finetune(model, stage.config, path, progress=False, **common)
    elif stage.kind == "compress":
        from s2d.commands.compress import run_compress

        e = stage.extras
        run_compress(model, stage.config, path, tuple(e["eval"]), merge=e["merge"], save_model=True,
                     eval_limit=e["limit"], ppl_tokens=e["ppl_tokens"], **common)
    elif stage.kind == "quantize":
        from s2d.commands.quantize import run_quantize

        run_quantize(model, stage.config, path, save_model=True, progress=False, **common)
    elif stage.kind == "eval":
        from s2d.commands.eval import run_eval

        run_eval(model, stage.config, path, **common)
    elif stage.kind == "diagnose":
        from s2d.commands.diagnose import run_diagnose

        run_diagnose(model, stage.config, path, **common)
    elif stage.kind == "export":
        from s2d.commands import export

        export.run_export(model, stage.config, path, **common)
    else:
        raise S2DError(f"unknown stage {stage.kind!r}")


# -- the table and the report ----------------------------------------------------------------------------------

def _metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _value(result: dict):
    return result.get("ppl", result.get("acc"))


def _evals(results: dict) -> dict:
    return {task: _value(r) for task, r in (results or {}).items() if isinstance(r, dict) and _value(r) is not None}


def count_parameters(folder: Path) -> int | None:
    """Parameters in a saved model's safetensors (their headers only; quantized folders count the float copy)."""
    import struct

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for d in entry["shape"]:
                    count *= d
                total += count
    return total


def _size(folder: Path) -> int | None:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else None


def collect(recipe: Recipe, cells: list[list[Planned]], out: Path,
            evaluations: list[list[Evaluation]] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(models, stages, cells) rows from the finished stages' metrics.json and state files; a model row's
    `shared` holds the recipe's shared evaluation of it."""
    models = {"input": {"name": f"input: {recipe.model}", "stage": "-", "metrics": {}, "params": None,
                        "size_bytes": None, "seconds": None}}
    if Path(recipe.model).expanduser().is_dir():
        folder = Path(recipe.model).expanduser()
        models["input"].update(params=count_parameters(folder), size_bytes=_size(folder))
    stages, seen = [], set()
    for steps in cells:
        for step in steps:
            if step.folder in seen:
                continue
            seen.add(step.folder)
            state = _state(out, step.folder) or {}
            stages.append({"folder": step.folder, "stage": step.stage.kind, "status": state.get("status", "-"),
                           "seconds": state.get("seconds")})
            m, kind, into = _metrics(out / step.folder), step.stage.kind, models.setdefault(step.input_row, {
                "name": step.input_row, "stage": "-", "metrics": {}})
            if kind in MODEL_STAGES:
                model_dir = out / step.folder / "model"
                row = {"name": step.folder, "stage": kind, "metrics": {}, "params": count_parameters(model_dir),
                       "size_bytes": _size(model_dir), "seconds": state.get("seconds"), "average_bits": None}
                models[step.folder] = row
            if kind == "finetune":
                last = (m.get("evals") or [{}])[-1]
                row["metrics"].update({k: v for k, v in last.items() if k != "step" and isinstance(v, float)})
                if into.get("params") is None and step.stage.config.task == "lm":
                    into["params"] = row["params"]
            elif kind == "compress":
                row["metrics"].update(_evals(m.get("eval")))
                # the stage's own count: a factorized folder also stores a tied lm_head, which the files count twice
                row["params"] = m.get("compression", {}).get("summary", {}).get("params_after", row["params"])
                if into.get("params") is None:
                    into["params"] = m.get("compression", {}).get("summary", {}).get("params_before")
            elif kind == "quantize":
                results = m.get("results", {})
                into["metrics"].update({k: v for k, v in _evals(results.get("FP", {}).get("eval")).items()
                                        if k not in into["metrics"]})
                cell = next((v for key, v in results.items() if key != "FP"), {})
                row["metrics"].update(_evals(cell.get("eval")))
                row["average_bits"] = cell.get("average_bits")
                if into.get("params") is None:
                    into["params"] = row["params"]
                row["params"] = into["params"]  # quantizing keeps the count; its folder also holds a float copy
            elif kind == "eval":
                into["metrics"].update(_evals(m.get("tasks")))
            elif kind == "diagnose":
                severity = m.get("severity", {})
                into["metrics"].update({f"diagnose {k}": severity[k] for k in ("max_abs", "mean_kurtosis")
                                        if isinstance(severity.get(k), int | float)})
    for evals in evaluations or []:
        for e in evals:
            if e.row in models:
                models[e.row]["shared"] = _evals(_metrics(out / e.folder).get("tasks"))
                if e.model.endswith(".gguf") and models[e.row].get("size_bytes") is None:
                    models[e.row]["size_bytes"] = Path(e.model).stat().st_size if Path(e.model).is_file() else None
    cell_rows = []
    for cell, steps in zip(recipe.cells, cells, strict=True):
        last_model = next((s.folder for s in reversed(steps) if s.stage.kind in MODEL_STAGES), "input")
        final = models.get(last_model, {})
        seconds = [(_state(out, s.folder) or {}).get("seconds") for s in steps]
        cell_rows.append({"cell": cell.index, "label": cell.label() or "-", "values": _values(cell),
                          "model": last_model, "metrics": {**final.get("metrics", {}), **{
                              f"{k} (evaluate)": v for k, v in final.get("shared", {}).items()}},
                          "params": final.get("params"), "average_bits": final.get("average_bits"),
                          "size_bytes": final.get("size_bytes"),
                          "seconds": round(sum(s for s in seconds if s is not None), 3)})
    return list(models.values()), stages, cell_rows


def _values(cell: Cell) -> dict:
    return {f"{key.split('.', 1)[1]} (stage {key.split('.', 1)[0]})": value for key, value in cell.values.items()}


def write_table(recipe: Recipe, cells: list[list[Planned]], out: Path, argv: list[str] | None = None,
                evaluations: list[list[Evaluation]] | None = None) -> list[dict]:
    """table.json and table.md (one row per cell), report.md and report.html; returns the table rows."""
    from s2d.report.markdown import md_table
    from s2d.report.pipeline import metric_columns, write_run_report

    models, stages, rows = collect(recipe, cells, out, evaluations)
    swept = list(rows[0]["values"]) if rows else []
    atomic_write_json(out / "table.json", rows)
    columns = metric_columns(rows)
    atomic_write_text(out / "table.md", md_table(
        ["cell", *swept, "model", "parameters", "size bytes", "seconds", *columns],
        [[r["cell"], *[r["values"][k] for k in swept], r["model"], r["params"], r["size_bytes"], r["seconds"],
          *[r["metrics"].get(c) for c in columns]] for r in rows]))
    import shlex

    command = "s2d " + " ".join(shlex.quote(a) for a in argv) if argv else f"s2d run {recipe.path} --out {out}"
    write_run_report(out, f"s2d run: {recipe.path.name if recipe.path else 'recipe'} on {recipe.model}", models,
                     stages, rows, swept, command)
    return rows
