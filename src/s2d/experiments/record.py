"""What a run folder recorded: its metrics.json, and the settings its command ran with (config.yaml).

The results are written from these alone. A setting the text states is read here, and a run folder that does not
record it raises MissingSetting (the results document then lists the section as missing) instead of the text
falling back on a value typed into it.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml


class MissingSetting(LookupError):
    """A run folder the text needs a setting from is not there, or does not record that setting."""


def metrics(folder: Path, stage: str | None = None) -> dict | None:
    """folder[/stage]/metrics.json, or None while that run has not finished."""
    path = (folder / stage if stage else folder) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_config(folder: Path) -> dict:
    """A run folder's config.yaml: command, argv, seed, config (the command's full config), versions, threads."""
    path = folder / "config.yaml"
    if not path.is_file():
        raise MissingSetting(f"{path} is missing")
    return yaml.safe_load(path.read_text())


def setting(folder: Path, key: str) -> Any:
    """One setting of the command's config, e.g. "lr", or "lowrank.n_samples" inside a nested block."""
    value: Any = run_config(folder).get("config")
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MissingSetting(f"{folder / 'config.yaml'} records no {key}")
        value = value[part]
    return value


def shared(folders, key: str, show=str) -> str:
    """A setting of several runs as the text states it: its value, or its distinct values in order joined by ' / '
    (runs that differ say so rather than one of them speaking for all)."""
    folders = list(folders)
    if not folders:
        raise MissingSetting(f"no run folder to read {key} from")
    return " / ".join(show(v) for v in sorted({setting(f, key) for f in folders}))


def flags(folder: Path, names: tuple[str, ...]) -> list[str]:
    """The flags `names` of a run's command line (config.yaml's argv), each with its value, in their order."""
    argv = run_config(folder).get("argv") or []
    out: list[str] = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in names:
            out += [flag, value]
    return out


class Regularizer(dict):
    """A finetune run's regularizer options (reg_config): an option the run did not set reads as its regularizer's
    default, which is what it ran with (s2d.regularize.regularizer_config). `.reg` is the regularizer's name."""

    def __init__(self, folder: Path):
        super().__init__(setting(folder, "reg_config") or {})
        self.folder, self.reg = folder, setting(folder, "reg")

    def __missing__(self, key: str) -> Any:
        from s2d.errors import S2DError
        from s2d.regularize import regularizer_config  # the package imports torch: only when a default is asked for

        try:
            config = regularizer_config(self.reg, dict(self))
        except S2DError as err:
            raise MissingSetting(f"{self.folder / 'config.yaml'}: {err}") from err
        if config is None or key not in {f.name for f in fields(config)}:
            raise MissingSetting(f"{self.folder / 'config.yaml'}: reg {self.reg!r} has no option {key}")
        return getattr(config, key)


class Said(dict):
    """A finetune run's regularizer settings as the text says them, each read when the text names it (an AdamW run
    has no λ): tau and lam as hyperparameters (hyper), rows (pcdr_rows in words), form, and refreshes (how many
    times S2D refreshed its selection, from metrics.json)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def __missing__(self, key: str) -> str:
        if key == "refreshes":
            value = str(len(metrics(self.folder)["refreshes"]))
        else:
            reg = Regularizer(self.folder)
            value = row_words(reg["pcdr_rows"]) if key == "rows" else reg[key] if key == "form" else hyper(reg[key])
        self[key] = value
        return value


def hyper(value) -> str:
    """A hyperparameter as a person writes it: 5e-5, 1e-2, 0.5, 2, 1.005 (a YAML string such as "5e-4", which is
    how `--reg-option lam=5e-4` is recorded, is read as its number)."""
    x = float(value)
    if x and abs(x) < 0.1:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{x:g}"


def row_words(pcdr_rows: str) -> str:
    """S2D's pcdr_rows option in words: over which rows PCDR is averaged."""
    return {"all": "all rows", "outliers": "the outlier rows"}.get(pcdr_rows, f"the {pcdr_rows} rows")


def activations(sweeps: list[Path]) -> str:
    """The activation granularity of quantize runs' cells in words (per-token), from the QuantConfig each cell
    records in metrics.json."""
    grains = {cell["config"]["a_granularity"] for sweep in sweeps for cell in metrics(sweep)["results"].values()
              if "config" in cell}
    if not grains:
        raise MissingSetting(f"no quantized cell in {', '.join(map(str, sweeps)) or 'no run'} records its config")
    return " / ".join(g.replace("_", "-") for g in sorted(grains))


def count(n: int) -> str:
    """A small count in words, as prose says it (one, two, ...); larger ones as digits."""
    words = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    return words[n] if 0 <= n < len(words) else str(n)
