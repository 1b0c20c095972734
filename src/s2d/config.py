"""Small versioned config dataclasses that round-trip through YAML and JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

from s2d.errors import S2DError


@dataclasses.dataclass
class Config:
    """Base for every transform's config: subclasses are plain dataclasses with a VERSION."""

    VERSION: ClassVar[int] = 1
    HELP: ClassVar[dict[str, str]] = {}  # field -> the help of its command-line flag (s2d.cli builds flags from it)
    CHOICES: ClassVar[dict[str, tuple]] = {}  # field -> the values it accepts, where they are a closed list

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": type(self).__name__, "version": self.VERSION}
        out.update(dataclasses.asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise S2DError(f"a {cls.__name__} is a mapping of field: value, got {type(data).__name__} {data!r:.80}")
        data = dict(data)
        kind = data.pop("kind", cls.__name__)
        version = data.pop("version", cls.VERSION)
        if kind != cls.__name__:
            raise S2DError(f"config is a {kind}, expected {cls.__name__}")
        if version > cls.VERSION:
            raise S2DError(f"{kind} version {version} is newer than this s2d understands ({cls.VERSION}); upgrade s2d")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise S2DError(f"unknown {kind} fields: {sorted(unknown)}; known: {sorted(names)}")
        if not isinstance(version, int):
            raise S2DError(f"{kind} version must be a whole number, got {version!r}")
        # YAML and JSON have no tuples: restore them where the field's default is one, so configs compare equal.
        for f in dataclasses.fields(cls):
            if f.name in data and isinstance(data[f.name], list) and isinstance(f.default, tuple):
                data[f.name] = tuple(data[f.name])
            if f.name in data:
                data[f.name] = _coerce_number(kind, f.name, f.default, data[f.name])
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Self:
        return cls.from_dict(yaml.safe_load(text) or {})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise S2DError(f"config file {path} does not exist")
        try:
            text = path.read_text()
            return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise S2DError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                           f"{' '.join(str(err).split())}. Fix it, or start from a run folder's config.yaml") from err


def _coerce_number(kind: str, name: str, default: Any, value: Any) -> Any:
    """YAML 1.1 reads 5e-4 (no dot) as a string: numeric fields parse such strings, and reject any other text."""
    if not isinstance(value, str) or isinstance(default, bool) or not isinstance(default, int | float):
        return value
    try:
        number = float(value)
    except ValueError:
        raise S2DError(f"{kind}.{name} must be a number, got {value!r}") from None
    if isinstance(default, int):
        if not number.is_integer():
            raise S2DError(f"{kind}.{name} must be a whole number, got {value!r}")
        return int(number)
    return number
