"""Markdown helpers shared by every report."""

from __future__ import annotations

from collections.abc import Sequence


def fmt(value, digits: int = 4) -> str:
    """A number as a person reads it: integers with separators, floats to `digits` significant figures."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured Markdown table."""
    def cell(value) -> str:
        return fmt(value).replace("|", "\\|")  # "max |x|" must not end the cell

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
