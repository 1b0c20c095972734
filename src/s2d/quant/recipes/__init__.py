"""Named quantization recipes: readable YAML files beside this module, one per recipe.

A recipe is a set of QuantConfig fields (`config`), the fields added when the scheme quantizes the KV cache
(`with_kv`), and whether it rotates the model (`needs_rotation`), so a family that cannot be rotated is told
which recipe fits it instead of failing deep in the rotation code.
"""

from __future__ import annotations

from importlib import resources

import yaml

from s2d.errors import S2DError

NO_ROTATION = "norotate"


def recipe_names() -> tuple[str, ...]:
    return tuple(sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml")))


def recipe(name: str) -> dict:
    """The recipe file `name`, parsed: {"description", "needs_rotation", "config", "with_kv"}."""
    if name not in recipe_names():
        raise S2DError(f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())}")
    data = yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text())
    return {"with_kv": {}, **data}


def recipe_fields(name: str, kv: bool) -> dict:
    """The QuantConfig fields of recipe `name`; `kv` when the scheme quantizes the KV cache."""
    data = recipe(name)
    return {**data["config"], **(data["with_kv"] if kv else {})}


def recipe_text(name: str) -> str:
    recipe(name)
    return resources.files(__name__).joinpath(f"{name}.yaml").read_text()
