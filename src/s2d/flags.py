"""Command-line flags made from config dataclasses, so that a default and its help are written once, on the field.

A generated flag defaults to None ("not given"); the config then keeps its own default, which the help shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from s2d.config import Config
from s2d.errors import S2DError


def default_of(cls: type[Config], name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _base(hint):
    """int for `int | None`; (tuple, str) for `tuple[str, ...]`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return tuple, typing.get_args(hint)[0]
    return hint, None


def comma_list(kind: type):
    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return tuple(kind(t) for t in items)
        except ValueError:
            kinds = f"{kind.__name__}s"
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kinds}, got {text!r}") from None
    return parse


def add_flags(p: argparse.ArgumentParser, cls: type[Config], names: list[str], *, help_of: dict | None = None,
              **flag_of: str) -> None:
    """One flag per named field of `cls`: its type, choices, help and shown default all come from the class.

    `flag_of` renames a field's flag (e.g. seq_lens="seq-len"); the value still lands in `args.<field>`.
    `help_of` replaces a field's help where one text must read the same across commands (e.g. --limit).
    """
    hints = typing.get_type_hints(cls)
    for name in names:
        kind, item = _base(hints[name])
        flag = "--" + flag_of.get(name, name.replace("_", "-"))
        default = default_of(cls, name)
        text = (help_of or {}).get(name) or cls.HELP.get(name, name.replace("_", " "))
        help = f"{text} (default: {_show(default)})".replace("%", "%%")
        if kind is bool:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=help)
        elif kind is tuple:
            p.add_argument(flag, dest=name, type=comma_list(item), default=None, help=help, metavar="A,B")
        else:
            p.add_argument(flag, dest=name, type=kind, default=None, choices=cls.CHOICES.get(name), help=help)


def config_from(cls: type[Config], args: argparse.Namespace, names: list[str], base: Config | None = None,
                **fixed):
    """`base` (or the defaults) with every flag the user gave, and `fixed` values, validated by `from_dict`."""
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    data = {**(base.to_dict() if base is not None else {}), **given, **fixed}
    data.pop("kind", None), data.pop("version", None)
    return cls.from_dict(data)


def key_values(pairs: list[str] | None, flag: str) -> dict:
    """KEY=VALUE pairs, values read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise S2DError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise S2DError(f"{flag} {pair!r}: the value is not a number, boolean or plain string ({err})") from err
    return options
