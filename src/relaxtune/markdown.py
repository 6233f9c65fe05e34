"""Markdown tables, as the datasheets and the fine-tuning report write them."""

from __future__ import annotations

from typing import Any, Callable, Sequence


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]],
                   fmt: Callable[[Any], str] = str) -> list[str]:
    """A GitHub-style markdown table (its lines; a blank line must follow it). Strings go in as they are, other
    values through ``fmt``; a literal | is escaped."""

    def cell(value: Any) -> str:
        return (value if isinstance(value, str) else fmt(value)).replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
