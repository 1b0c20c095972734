"""The one-way flow of docs/architecture.md, checked on the source: every import of s2d by s2d, read with ast.

Rooms, bottom to top: the utilities (errors, io, config, memory, version, spectral); arch and assets; the
methods (diagnose, quant, lowrank, regularize, train) and eval and report beside them; runs; the command
layer (commands); cli; experiments. The `s2d` package facade (__init__) sits outside the flow: nothing in it
imports it.
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "s2d"
METHODS = {"diagnose", "quant", "lowrank", "regularize", "train", "export"}  # export: a format writer, ruled alike
ABOVE_METHODS = {"eval", "report", "runs", "commands", "cli", "experiments"}
DATA_NAMES = None  # the public names of s2d.assets.data, filled on first use


def _room(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else "s2d"


def _imports() -> list[tuple[str, str, str, tuple[str, ...], int]]:
    """(room, file, imported module, imported names, line) for every `import s2d...` anywhere in a file."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "s2d":
                found.append((_room(path), str(path.relative_to(SRC)), node.module,
                              tuple(a.name for a in node.names), node.lineno))
            elif isinstance(node, ast.Import):
                found += [(_room(path), str(path.relative_to(SRC)), a.name, (), node.lineno)
                          for a in node.names if a.name.split(".")[0] == "s2d"]
    return found


def _target(module: str, names: tuple[str, ...]) -> set[str]:
    """The rooms an import reaches: `from s2d import regularize` reaches regularize, not the facade."""
    parts = module.split(".")
    if len(parts) > 1:
        return {parts[1]}
    rooms = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if not p.name.startswith("__")}
    return {n for n in names if n in rooms} or {"s2d"}


def _edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for room, _, module, names, _ in _imports():
        edges[room] |= _target(module, names) - {room}
    return edges


def _offending(rule) -> list[str]:
    return [f"{file}:{line} imports {module}" for room, file, module, names, line in _imports()
            if any(rule(room, target, module, names) for target in _target(module, names) - {room})]


def test_arch_and_assets_import_no_method_and_nothing_above():
    assert _offending(lambda room, target, *_: room in ("arch", "assets")
                      and target in METHODS | ABOVE_METHODS) == []


def test_methods_import_neither_eval_report_runs_nor_the_command_layer():
    assert _offending(lambda room, target, *_: room in METHODS and target in ABOVE_METHODS) == []


def test_methods_take_data_from_assets_but_never_load_models():
    global DATA_NAMES
    if DATA_NAMES is None:
        tree = ast.parse((SRC / "assets" / "data.py").read_text())
        DATA_NAMES = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        DATA_NAMES |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                       if isinstance(t, ast.Name)}

    def loads_models(room, target, module, names):
        if room not in METHODS or target != "assets":
            return False
        return module not in ("s2d.assets", "s2d.assets.data") or not set(names) <= DATA_NAMES
    assert _offending(loads_models) == []


def test_eval_knows_neither_quant_nor_lowrank():
    assert _offending(lambda room, target, *_: room == "eval" and target in ("quant", "lowrank")) == []


def test_regularize_does_not_import_train_and_diagnose_does_not_import_regularize():
    assert _offending(lambda room, target, *_: (room, target) in (("regularize", "train"),
                                                                   ("diagnose", "regularize"))) == []


def test_only_the_cli_and_the_command_layer_read_sys_argv():
    readers = []
    for path in sorted(SRC.rglob("*.py")):
        if _room(path) in ("cli", "commands"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", "") == "sys":
                readers.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert readers == []


def test_nothing_imports_the_facade_or_the_experiments():
    assert _offending(lambda room, target, *_: target == "s2d" and room != "s2d") == []
    assert _offending(lambda room, target, *_: target == "experiments" and room != "experiments") == []


def test_no_import_cycles_between_rooms():
    edges = _edges()
    cycles = []

    def walk(node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt != "s2d":
                walk(nxt, [*path, nxt])
    for start in sorted(edges):
        if start != "s2d":
            walk(start, [start])
    assert cycles == []


def test_no_cycles_between_modules_of_one_room():
    """lowrank.api and lowrank.search once imported each other; within a room, modules form a DAG too."""
    graph = defaultdict(set)
    for room, file, module, _, _ in _imports():
        if module.count(".") >= 2 and module.split(".")[1] == room:
            here = "s2d." + file.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            if not file.endswith("__init__.py"):
                graph[here].add(module)
    cycles = []

    def walk(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif len(path) < 12:
                walk(nxt, [*path, nxt])
    for start in sorted(graph):
        walk(start, [start])
    assert sorted(set(cycles)) == []


@pytest.mark.parametrize("rule_breaker", ["from s2d.eval import perplexity", "import s2d.commands.load"])
def test_the_checks_do_catch_an_import_against_the_flow(tmp_path, monkeypatch, rule_breaker):
    """A planted import in a copy of one method module is found (the rules are not vacuous)."""
    import shutil

    copy = tmp_path / "s2d"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "quant" / "primitives.py"
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {rule_breaker}\n")
    monkeypatch.setattr(__import__(__name__), "SRC", copy)
    assert _offending(lambda room, target, *_: room in METHODS and target in ABOVE_METHODS) == \
        [f"quant/primitives.py:{len(target.read_text().splitlines())} imports {rule_breaker.split()[1]}"]
