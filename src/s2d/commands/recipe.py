"""A recipe for `s2d run`: read the YAML, build and validate every stage's config, expand sweeps into cells.

Nothing here loads a model or writes a file; `s2d.commands.run` executes what this module has checked.

    model: tiny:llama            # required: what the first stage reads
    seed: 0                      # optional: every stage that does not set its own seed gets it
    stages:                      # required: run in order, each reading the model the last model stage saved
      - stage: finetune          # finetune | compress | quantize | eval | diagnose | export
        steps: 4                 # the options of that subcommand's config (TrainConfig here)
      - stage: compress
        method: rom
        sweep: {keep: [0.9, 0.8]}  # a grid: one cell per value (several stages' sweeps multiply)
    evaluate:                    # optional: one evaluation (EvalConfig) run on every model the recipe made,
      tasks: [ppl:wiki]          # the input included, so the report compares them on the same footing
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from s2d.errors import S2DError

STAGES = ("finetune", "compress", "quantize", "eval", "diagnose", "export")
MODEL_STAGES = ("finetune", "compress", "quantize", "export")  # stages that save a model the next stage reads
TOP_KEYS = ("model", "seed", "stages", "evaluate", "trust_remote_code")
# Options of a stage that are not fields of its config: the extra flags of the subcommand.
COMPRESS_EXTRAS = {"eval": (), "limit": None, "ppl_tokens": 16384, "merge": False}
QUANT_ALIASES = ("scheme", "method", "recipe")  # --scheme, --method and --recipe of `s2d quantize`


# stage -> (module, class) of the config its subcommand validates; imported only when a recipe uses the stage
STAGE_CONFIGS = {"finetune": ("s2d.train", "TrainConfig"), "compress": ("s2d.lowrank", "LowRankConfig"),
                 "quantize": ("s2d.commands.quantize", "QuantRunConfig"), "eval": ("s2d.eval.suite", "EvalConfig"),
                 "diagnose": ("s2d.diagnose", "DiagnoseConfig"), "export": ("s2d.export.gguf", "ExportConfig")}


def _config_class(kind: str):
    if kind not in STAGE_CONFIGS:
        return None
    module, name = STAGE_CONFIGS[kind]
    return getattr(importlib.import_module(module), name)


def export_available() -> bool:
    """`s2d export` is wired once its command module exists."""
    import importlib.util

    return importlib.util.find_spec("s2d.commands.export") is not None


def known_options(kind: str) -> list[str]:
    cls = _config_class(kind)
    names = [f.name for f in dataclasses.fields(cls)] if cls is not None else []
    if kind == "compress":
        names += list(COMPRESS_EXTRAS)
    if kind == "quantize":
        names += list(QUANT_ALIASES)
    return sorted(names)


@dataclass
class Stage:
    """One stage of one cell, with its validated config and the options that built it."""

    index: int
    kind: str
    options: dict  # as written, with the cell's sweep values filled in
    config: Any = None  # the validated config dataclass
    extras: dict = field(default_factory=dict)  # compress: eval, limit, ppl_tokens, merge
    line: int | None = None
    swept: dict = field(default_factory=dict)  # this stage's sweep values in this cell

    def resolved(self) -> dict:
        """Every setting the stage runs with, as plain YAML-able data (recorded and hashed)."""
        out = {"stage": self.kind}
        if self.config is not None:
            out["config"] = _plain(self.config.to_dict())
        if self.extras:
            out["extras"] = _plain(self.extras)
        return out


@dataclass
class Cell:
    index: int
    stages: list[Stage]
    values: dict  # "<stage index>.<option>" -> value, for every swept option

    def label(self, upto: int | None = None) -> str:
        """The swept values of stages ≤ upto, e.g. "keep0.9-schemeW4A4" ("" when nothing is swept)."""
        parts = [f"{key.split('.', 1)[1]}{_short(v)}" for key, v in self.values.items()
                 if upto is None or int(key.split(".", 1)[0]) <= upto]
        return "-".join(parts)


@dataclass
class Recipe:
    path: Path | None
    model: str
    seed: int | None
    trust_remote_code: bool
    cells: list[Cell]
    sweeps: dict  # "<stage index>.<option>" -> list of values
    evaluate: Any = None  # the EvalConfig every model is scored with, or None

    def resolved(self) -> dict:
        """recipe.yaml of the run folder: every stage's full config (of the first cell; the sweeps beside it)."""
        from s2d.version import __version__

        return {"s2d": __version__, "recipe": str(self.path) if self.path else None, "model": self.model,
                "seed": self.seed, "trust_remote_code": self.trust_remote_code,
                "sweeps": {k: _plain(v) for k, v in self.sweeps.items()},
                "evaluate": _plain(self.evaluate.to_dict()) if self.evaluate is not None else None,
                "cells": [{"index": c.index, "values": _plain(c.values),
                           "stages": [s.resolved() for s in c.stages]} for c in self.cells]}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise S2DError(f"recipe {path} does not exist")
    return parse_recipe(path.read_text(), path)


def parse_recipe(text: str, path: Path | None = None) -> Recipe:
    """Read and validate a whole recipe before anything runs; every error names the stage and its line."""
    where = str(path) if path else "recipe"
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        raise S2DError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise S2DError(f"{where}: a recipe is a mapping with model, stages and optionally seed")
    lines = _lines(root)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise S2DError(f"{where}{_at(lines['top'].get(unknown[0]))}: unknown recipe key {unknown[0]!r}; known: "
                       f"{', '.join(TOP_KEYS)}")
    model = data.get("model")
    if not model or not isinstance(model, str):
        raise S2DError(f"{where}: the recipe names no model; add e.g. `model: tiny:llama` (a name, tiny:<family>, "
                       "or a model folder) as its first line")
    _check_model(model, where, lines["top"].get("model"))
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise S2DError(f"{where}{_at(lines['top'].get('seed'))}: seed must be a whole number, got {seed!r}")
    if not isinstance(data.get("trust_remote_code", False), bool):
        raise S2DError(f"{where}{_at(lines['top'].get('trust_remote_code'))}: trust_remote_code is true or false")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise S2DError(f"{where}: `stages` must be a non-empty list of {{stage: NAME, ...options}}, with NAME one of "
                       f"{', '.join(STAGES)}")
    raw, sweeps = [], {}
    for i, entry in enumerate(stages):
        line = lines["stages"][i] if i < len(lines["stages"]) else None
        name = f"{where}{_at(line)}: stage {i}"
        if not isinstance(entry, dict) or "stage" not in entry:
            raise S2DError(f"{name} must be a mapping with a `stage:` key ({', '.join(STAGES)}), got {entry!r:.60}")
        kind = entry["stage"]
        if kind not in STAGES:
            raise S2DError(f"{name}: unknown stage {kind!r}; use one of {', '.join(STAGES)}")
        if kind == "export" and not export_available():
            raise S2DError(f"{name}: `export` is not available in this s2d yet (there is no `s2d export` command); "
                           "drop the stage, and use the last stage's model/ folder")
        options = {k: v for k, v in entry.items() if k not in ("stage", "sweep")}
        sweep = entry.get("sweep") or {}
        if not isinstance(sweep, dict) or any(not isinstance(v, list) or not v for v in sweep.values()):
            raise S2DError(f"{name} ({kind}): `sweep` maps options to non-empty lists of values, e.g. "
                           "sweep: {keep: [0.9, 0.8]}")
        known = known_options(kind)
        option_lines = lines["options"][i] if i < len(lines["options"]) else {}
        for key in [*options, *sweep]:
            if key not in known:
                raise S2DError(f"{where}{_at(option_lines.get(key, line))}: stage {i} ({kind}): unknown option "
                               f"{key!r}; known: {', '.join(known)}")
        both = sorted(set(options) & set(sweep))
        if both:
            raise S2DError(f"{name} ({kind}): {both[0]} is given both as an option and in sweep; keep one")
        for key, values in sweep.items():
            sweeps[f"{i}.{key}"] = values
        raw.append((kind, options, line))
    cells = []
    keys = list(sweeps)
    for n, combo in enumerate(itertools.product(*(sweeps[k] for k in keys))):
        values = dict(zip(keys, combo, strict=True))
        cell_stages = []
        for i, (kind, options, line) in enumerate(raw):
            swept = {k.split(".", 1)[1]: v for k, v in values.items() if int(k.split(".", 1)[0]) == i}
            cell_stages.append(build_stage(i, kind, {**copy.deepcopy(options), **swept}, seed, line, where, swept))
        check_order(cell_stages, model, where, f" (cell {n}: {Cell(n, [], values).label()})" if keys else "")
        cells.append(Cell(n, cell_stages, values))
    evaluate = build_evaluate(data.get("evaluate"), seed, f"{where}{_at(lines['top'].get('evaluate'))}")
    return Recipe(path, model, seed, bool(data.get("trust_remote_code", False)), cells, sweeps, evaluate)


def build_evaluate(options, seed: int | None, name: str):
    """The recipe's shared evaluation: `s2d eval`'s options, validated like an eval stage's."""
    if options is None:
        return None
    if not isinstance(options, dict) or not options.get("tasks"):
        raise S2DError(f"{name}: `evaluate` maps eval options to values and needs tasks, e.g. "
                       "evaluate: {tasks: [ppl:wiki]}")
    from s2d.eval.suite import EvalConfig

    data = dict(options)
    if seed is not None and "seed" not in data:
        data["seed"] = seed
    try:
        return EvalConfig.from_dict(data).validate()
    except (S2DError, TypeError, ValueError) as err:
        raise S2DError(f"{name}: evaluate: {err}") from err


def build_stage(index: int, kind: str, options: dict, seed: int | None, line: int | None, where: str = "recipe",
                swept: dict | None = None) -> Stage:
    """The stage's config from its options, by the same `Config.from_dict` and `validate` as its subcommand."""
    name = f"{where}{_at(line)}: stage {index} ({kind})"
    stage = Stage(index, kind, options, line=line, swept=dict(swept or {}))
    data = dict(options)
    cls = _config_class(kind)
    if seed is not None and "seed" not in data and "seed" in {f.name for f in dataclasses.fields(cls)}:
        data["seed"] = seed  # export, for one, draws nothing at random and has no seed
    if kind == "compress":
        stage.extras = {k: data.pop(k, default) for k, default in COMPRESS_EXTRAS.items()}
        if isinstance(stage.extras["eval"], str):
            stage.extras["eval"] = [stage.extras["eval"]]
        stage.extras["eval"] = list(stage.extras["eval"] or ())
    if kind == "quantize":
        data = _quant_aliases(data, name)
    try:
        config = cls.from_dict(data)
        config.validate()
        if kind == "compress" and stage.extras["eval"]:
            from s2d.eval.suite import EvalConfig

            EvalConfig(tasks=tuple(stage.extras["eval"]), limit=stage.extras["limit"],
                       ppl_tokens=stage.extras["ppl_tokens"]).validate()
    except (S2DError, TypeError, ValueError) as err:
        lists = [k for k, v in options.items() if isinstance(v, list) and not isinstance(_default(cls, k), tuple)]
        hint = f" (to sweep {lists[0]}, write `sweep: {{{lists[0]}: [...]}}`)" if lists else ""
        raise S2DError(f"{name}: {err}{hint}") from err
    if kind == "quantize" and len(config.schemes) * len(config.methods) != 1:
        raise S2DError(f"{name}: a recipe's quantize stage makes one model: give one scheme and one method (got "
                       f"{len(config.schemes)} × {len(config.methods)}); for a grid write e.g. "
                       "`sweep: {scheme: [W4A4, W4A8]}`")
    stage.config = config
    return stage


def _default(cls, name: str):
    field_ = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    if field_ is None:
        return None
    return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default


def _quant_aliases(data: dict, name: str) -> dict:
    """scheme: W4A4, method: gptq and recipe: best, as `s2d quantize --scheme/--method/--recipe` take them."""
    data = dict(data)
    if "scheme" in data:
        if "schemes" in data:
            raise S2DError(f"{name}: give scheme or schemes, not both")
        data["schemes"] = [data.pop("scheme")]
    given = [k for k in ("method", "recipe", "methods") if k in data]
    if len(given) > 1:
        raise S2DError(f"{name}: give one of method, recipe and methods (got {', '.join(given)})")
    if given and given[0] != "methods":
        data["methods"] = [data.pop(given[0])]
    for key in ("schemes", "methods"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    return data


def model_state(model: str) -> str:
    """What the recipe's input already is: "dense", "lowrank" or "quantized" (from an s2d folder's config.json)."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return "dense"
    try:
        raw = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return "dense"
    return "quantized" if "quantization" in raw else "lowrank" if "low_rank" in raw else "dense"


def check_order(stages: list[Stage], model: str, where: str = "recipe", cell: str = "") -> None:
    """Refuse a stage that cannot follow the ones before it (the model state each leaves behind)."""
    state = model_state(model)
    rank_step = 1  # every rank of the compress stage before is a multiple of it
    for s in stages:
        name = f"{where}{_at(s.line)}: stage {s.index} ({s.kind}){cell}"
        if state == "exported":
            raise S2DError(f"{name} cannot follow an export stage: export writes a GGUF file, not a folder the next "
                           "stage can read; make export the last stage")
        if s.kind == "export":
            state = "exported"
        elif s.kind == "finetune":
            if state == "quantized":
                raise S2DError(f"{name} cannot follow a quantize stage: the quantized model's weights sit on an "
                               "integer grid. Fine-tune before quantizing, or train with `qat: W4A4`")
            if state == "lowrank":
                raise S2DError(f"{name} cannot follow a compress stage: fine-tuning saves a dense folder, which "
                               "would drop the low-rank factors. Fine-tune before compressing (or compress with "
                               "merge: true)")
        elif s.kind == "compress":
            if state == "quantized":
                raise S2DError(f"{name} cannot follow a quantize stage: compress the float model, then quantize")
            if state == "lowrank":
                raise S2DError(f"{name}: the model is already low-rank (compressed once); give one compress stage")
            state = "dense" if s.extras.get("merge") else "lowrank"
            rank_step = s.config.rank_multiple
        elif s.kind == "quantize":
            if state == "quantized":
                raise S2DError(f"{name}: the model is already quantized; give one quantize stage")
            config = s.config
            scheme, method = config.schemes[0], config.methods[0]
            if state == "lowrank" and config.quant_config(scheme, method).smooth_alpha is not None:
                raise S2DError(f"{name}: method {method!r} applies SmoothQuant, which cannot rescale the low-rank "
                               "pairs an earlier compress stage made. Use rotation, RTN or GPTQ (e.g. rotate+gptq or "
                               "recipe: best) after compressing, compress with merge: true, or quantize first")
            if state == "lowrank":
                _check_groups(config.quant_config(scheme, method), rank_step, name)
            state = "quantized"


def _check_groups(q, rank_step: int, name: str) -> None:
    """Groups along a factorized Linear's inner input (its rank) must divide every rank the compress stage picks."""
    for what, granularity, group in (("activation", q.a_granularity, q.a_group_size),
                                     ("weight", q.w_granularity, q.w_group_size)):
        if granularity == "per_group" and group and rank_step % group:
            raise S2DError(f"{name}: quantizes {what}s in groups of {group}, and the factors the compress stage "
                           f"before makes have inner inputs of any rank (rank_multiple={rank_step}); give that "
                           f"stage `rank_multiple: {group}` (or a multiple of it), or merge: true")


def stage_key(stage: Stage, input_key: str) -> str:
    """The identity of a stage's result: its resolved config and the identity of what it reads."""
    blob = json.dumps({"stage": stage.resolved(), "input": input_key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_identity(model: str) -> str:
    """A name as given; a folder by its path and the sizes and times of its files (an edited folder is new)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return model
    files = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([str(folder.resolve()), files]).encode()).hexdigest()[:16]


def _check_model(model: str, where: str, line: int | None) -> None:
    from s2d.assets.tiny import TINY_FAMILIES

    if model in ("smollm2-135m", "minilm-l6") or model.startswith("scratch:"):
        return
    if model.startswith("tiny:"):
        if model.split(":", 1)[1] not in TINY_FAMILIES:
            raise S2DError(f"{where}{_at(line)}: unknown tiny model {model!r}; use tiny:<family> with one of "
                           f"{', '.join(TINY_FAMILIES)}")
        return
    if not Path(model).expanduser().is_dir():
        raise S2DError(f"{where}{_at(line)}: model {model!r} is neither a known model (smollm2-135m, minilm-l6, "
                       "tiny:<family>, scratch:<name>) nor an existing model folder")


def _lines(root) -> dict:
    """1-based line numbers of the top-level keys, of each stage, and of each stage's option keys."""
    out = {"top": {}, "stages": [], "options": []}
    if not isinstance(root, yaml.MappingNode):
        return out
    for key, value in root.value:
        out["top"][key.value] = key.start_mark.line + 1
        if key.value == "stages" and isinstance(value, yaml.SequenceNode):
            for item in value.value:
                out["stages"].append(item.start_mark.line + 1)
                options = {}
                if isinstance(item, yaml.MappingNode):
                    for k, v in item.value:
                        options[k.value] = k.start_mark.line + 1
                        if k.value == "sweep" and isinstance(v, yaml.MappingNode):
                            options.update({sk.value: sk.start_mark.line + 1 for sk, _ in v.value})
                out["options"].append(options)
    return out


def _at(line: int | None) -> str:
    return f" line {line}" if line else ""


def _short(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return "".join(c if c.isalnum() or c in ".,+_" else "_" for c in text)[:40]


def _plain(obj):
    """Tuples as lists, so what is recorded reads back as it hashes."""
    return json.loads(json.dumps(obj, default=str))
