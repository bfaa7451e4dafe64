"""pydantic's validation errors as one line per problem, naming the field; a value is cut short (a
70 KB value must not come back whole in an error)."""

from __future__ import annotations

from pydantic import ValidationError

from gptoss.errors import shorten


def describe_validation_error(error: ValidationError) -> list[str]:
    """One line per problem: "engine.max_num_seqs: Input should be greater than 0 (got -1)"."""
    lines = []
    for problem in error.errors():
        where = ".".join(_short_part(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif "input" in problem and not isinstance(problem["input"], dict | list):
            message += f" (got {shorten(problem['input'])})"
        lines.append(f"{where}: {message}")
    return lines


def _short_part(part: object) -> str:
    """A location part: a field name, an index or a client's dict key (cut short)."""
    text = str(part)
    return text if len(text) <= 64 else f"{text[:61]}..."
