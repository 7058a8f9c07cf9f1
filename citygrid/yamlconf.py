"""Operator-written YAML (rules, billing): every error at once, with file:line:column.

YAML is composed with its marks, so a pydantic validation error's location can
be turned back into the line and column of the key or value it is about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ConfigError(ValueError):
    """A file refused whole; ``problems`` lists every error found."""

    def __init__(self, problems: list[ConfigProblem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems




class Marks:
    def __init__(self) -> None:
        self.values: dict[tuple, tuple[int, int, bool]] = {}  # path → (line, col, quoted)
        self.keys: dict[tuple, tuple[int, int]] = {}

    def at(self, loc: tuple, key: bool = False) -> tuple[int, int]:
        loc = tuple(loc)
        while loc:
            if key and loc in self.keys:
                return self.keys[loc]
            if loc in self.values:
                line, col, _ = self.values[loc]
                return line, col
            loc = loc[:-1]
        return self.values.get((), (1, 1, False))[:2]


_SCALARS = yaml.SafeLoader("")  # YAML's own resolver types the scalars (ints, bools, nulls…)


# Operator files are small: these bounds refuse a YAML bomb (aliases that expand a few
# lines into billions of values) or a pathological nesting before they cost anything.
MAX_BYTES = 1_000_000
MAX_VALUES = 100_000
MAX_DEPTH = 40


class _TooBig(Exception):
    def __init__(self, node: yaml.Node, message: str):
        self.node, self.message = node, message


def _construct(node: yaml.Node, path: tuple, marks: Marks, budget: list[int] | None = None
               ) -> Any:
    if budget is None:
        budget = [MAX_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig(node, f"expands to more than {MAX_VALUES:,} values (aliases repeating "
                      "aliases?): refused")
    if len(path) > MAX_DEPTH:
        raise _TooBig(node, f"nested deeper than {MAX_DEPTH} levels: refused")
    quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
    marks.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1, quoted)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = _SCALARS.construct_object(key_node, deep=True)
            marks.keys[path + (key,)] = (key_node.start_mark.line + 1,
                                        key_node.start_mark.column + 1)
            out[key] = _construct(value_node, path + (key,), marks, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), marks, budget) for i, v in enumerate(node.value)]
    try:
        return _SCALARS.construct_object(node, deep=True)
    except ValueError as e:  # a date that does not exist: 2026-02-30
        raise _TooBig(node, f"not valid here: {node.value!r}: {e}") from None


MAX_FLOW_DEPTH = 100


def _flow_too_deep(text: str) -> tuple[int, int] | None:
    """Where ``[``/``{`` nesting first passes MAX_FLOW_DEPTH (line, column), or None.

    PyYAML's pure-Python composer takes seconds to reach its recursion limit on 10,000 open
    brackets; one pass over the characters (quotes and comments skipped) refuses it at once.
    """
    depth, quote, line, col, prev = 0, "", 1, 0, " "
    for ch in text:
        col += 1
        if ch == "\n":
            line, col = line + 1, 0
            if quote == "#":
                quote = ""
        elif quote:
            if ch == quote and quote != "#":
                quote = ""
        elif ch in "'\"" or (ch == "#" and prev in " \t"):
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > MAX_FLOW_DEPTH:
                return line, col
        elif ch in "]}" and depth:
            depth -= 1
        prev = ch
    return None


def parse(text: str, name: str) -> tuple[Any, Marks]:
    marks = Marks()
    if len(text) > MAX_BYTES:
        raise ConfigError([ConfigProblem(name, 1, 1, f"{len(text):,} characters; the limit is "
                                         f"{MAX_BYTES:,}")])
    deep = _flow_too_deep(text)
    if deep:
        raise ConfigError([ConfigProblem(name, *deep, f"brackets nested more than "
                                         f"{MAX_FLOW_DEPTH} deep: refused")])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError([ConfigProblem(name, 1, 1, "nested too deeply to read: refused")]
                          ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([ConfigProblem(name, line, col, f"not valid YAML: "
                                         f"{getattr(e, 'problem', e)}")]) from None
    if node is None:
        return {}, marks
    try:
        return _construct(node, (), marks), marks
    except _TooBig as e:
        raise ConfigError([ConfigProblem(name, e.node.start_mark.line + 1,
                                         e.node.start_mark.column + 1, e.message)]) from None
    except yaml.YAMLError as e:  # a scalar no safe constructor takes (e.g. a bare `=`)
        mark = getattr(e, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([ConfigProblem(name, line, col, f"not valid here: "
                                         f"{getattr(e, 'problem', e)}")]) from None


def friendly(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {err['loc'][-1]!r}" + (f" in {'.'.join(map(str, err['loc'][:-1]))}"
                                                    if len(err["loc"]) > 1 else "")
    if err["type"] == "missing":
        return f"missing {err['loc'][-1]!r}" + (f" in {'.'.join(map(str, err['loc'][:-1]))}"
                                                if len(err["loc"]) > 1 else "")
    if err["type"] in ("literal_error", "string_pattern_mismatch", "less_than_equal",
                       "greater_than_equal", "greater_than", "float_parsing", "bool_parsing",
                       "string_type", "float_type", "int_type"):
        return f"{loc}: got {err.get('input')!r}; {msg}"
    return f"{loc}: {msg}" if loc else msg


def dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen, out = set(), []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out




def validate(model: type[BaseModel], data: Any, marks: Marks, name: str) -> BaseModel:
    """Validate ``data`` with ``model``; raise :class:`ConfigError` with every problem located."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(dedupe(located(e, marks, name))) from None


def located(e: ValidationError, marks: Marks, name: str) -> list[ConfigProblem]:
    problems = []
    for err in e.errors(include_url=False):
        # Union branches add their type name to the location; drop those parts (never the
        # first, a top-level key, nor an unknown key itself: `A:` is a key, not a branch).
        raw = err["loc"]
        keep = len(raw) - 1 if err["type"] == "extra_forbidden" else None
        loc = tuple(p for i, p in enumerate(raw) if i == 0 or i == keep or not (
            isinstance(p, str) and (p[:1].isupper() or p in ("str", "int", "float", "list[str]")
                                    or p.startswith("function-"))))
        line, col = marks.at(loc, key=err["type"] == "extra_forbidden")
        problems.append(ConfigProblem(name, line, col, friendly({**err, "loc": loc})))
    return sorted(problems, key=lambda p: (p.line, p.column))
