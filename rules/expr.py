"""The rule condition language: a small, safe subset of Python expressions.

Rule text is parsed with :mod:`ast` (parsing runs nothing) and compiled into
closures from a whitelist: literals, ``and``/``or``/``not``, comparisons,
arithmetic, a few names (``reading``, ``device``, ``light``, ``sun``, ``local``)
with their attributes, and a few functions. Nothing else is accepted — no
imports, subscripts, lambdas, comprehensions, dunder attributes or calls of
anything not listed — so a rule cannot reach the file system or the network.

Examples::

    reading.motion and sun.elevation < -4
    reading.power_w < 0.1 * device.rated_w and light.level > 0
    avg_over("no2_ugm3", "15m") > 200
    local.hour >= 23 or local.hour < 5
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROOTS = {
    "reading": "the reading that triggered the rule (its fields: reading.lux, reading.motion, …)",
    "device": "the device's fleet metadata (device.id, device.district, device.rated_w, …)",
    "light": "the light's state in the engine (light.level: the level last commanded)",
    "sun": "sun.elevation: the sun's elevation in degrees at the event time",
    "local": "local time in the city: local.hour (e.g. 23.5), local.minute, local.weekday (0=Mon)",
    "meter": "a meter's billing: meter.unbilled_kwh, meter.unbilled_amount, meter.period_ended",
}
WINDOW_FUNCTIONS = ("avg_over", "min_over", "max_over", "count_over")
FUNCTIONS = {"abs": abs, "min": min, "max": max, "round": round}

_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Mod: operator.mod}


class ExprError(ValueError):
    """A rule expression that is not in the language; ``offset`` is the column in the text."""

    def __init__(self, message: str, offset: int = 0):
        super().__init__(message)
        self.offset = offset


class EvalError(RuntimeError):
    """An expression that cannot be evaluated for this event (a missing field, a bad type)."""


@dataclass(frozen=True)
class Expression:
    source: str
    evaluate: Callable[[Any], Any]  # takes the evaluation context
    windows: tuple[tuple[str, float], ...]  # (field, seconds) the expression looks back over

    def __call__(self, ctx: Any) -> Any:
        try:
            return self.evaluate(ctx)
        except EvalError:
            raise
        except (TypeError, ZeroDivisionError, ValueError) as e:
            raise EvalError(f"{self.source!r}: {e}") from None


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1h``, ``1h30m``, ``2d`` → seconds."""
    import re

    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration like 90s, 5m, 1h30m")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)|\s", "", text):
        raise ValueError(f"{text!r} is not a duration like 90s, 5m, 1h30m")
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in parts)


def compile_expression(source: str) -> Expression:
    """Compile rule text; raises :class:`ExprError` saying what is not allowed and where."""
    if not isinstance(source, str) or not source.strip():
        raise ExprError("an expression must be a non-empty string")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as e:
        raise ExprError(f"syntax error: {e.msg}", (e.offset or 1) - 1) from None
    windows: list[tuple[str, float]] = []
    fn = _compile(tree.body, windows)
    return Expression(source.strip(), fn, tuple(windows))


def _fail(node: ast.AST, message: str) -> ExprError:
    return ExprError(message, getattr(node, "col_offset", 0))


def _compile(node: ast.AST, windows: list) -> Callable[[Any], Any]:  # noqa: C901
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, int | float | str | bool | type(None)):
            raise _fail(node, f"constant {node.value!r} is not allowed")
        value = node.value
        return lambda ctx: value
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, windows) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda ctx: all(p(ctx) for p in parts)
        return lambda ctx: any(p(ctx) for p in parts)
    if isinstance(node, ast.UnaryOp):
        operand = _compile(node.operand, windows)
        if isinstance(node.op, ast.Not):
            return lambda ctx: not operand(ctx)
        if isinstance(node.op, ast.USub):
            return lambda ctx: -operand(ctx)
        raise _fail(node, "only 'not' and '-' are allowed before a value")
    if isinstance(node, ast.BinOp):
        op = _BINARY.get(type(node.op))
        if op is None:
            raise _fail(node, "arithmetic is + - * / % only")
        left, right = _compile(node.left, windows), _compile(node.right, windows)
        return lambda ctx: op(left(ctx), right(ctx))
    if isinstance(node, ast.Compare):
        ops = []
        for o in node.ops:
            if type(o) not in _COMPARE:
                raise _fail(node, "comparisons are < <= > >= == != only")
            ops.append(_COMPARE[type(o)])
        first = _compile(node.left, windows)
        rest = [_compile(c, windows) for c in node.comparators]

        def compare(ctx: Any) -> bool:
            left = first(ctx)
            for op, right_fn in zip(ops, rest, strict=True):
                right = right_fn(ctx)
                if left is None or right is None:
                    return False  # an unknown value satisfies no comparison
                if not op(left, right):
                    return False
                left = right
            return True

        return compare
    if isinstance(node, ast.IfExp):
        test, body, orelse = (_compile(n, windows) for n in (node.test, node.body, node.orelse))
        return lambda ctx: body(ctx) if test(ctx) else orelse(ctx)
    if isinstance(node, ast.Attribute):
        if not isinstance(node.value, ast.Name) or node.value.id not in ROOTS:
            raise _fail(node, f"attributes only of {', '.join(ROOTS)} (like reading.lux)")
        if node.attr.startswith("_"):
            raise _fail(node, f"no attribute {node.attr!r}")
        root, attr = node.value.id, node.attr
        return lambda ctx: ctx.lookup(root, attr)
    if isinstance(node, ast.Name):
        if node.id in ROOTS:
            raise _fail(node, f"{node.id} needs an attribute, e.g. {node.id}.{_example(node.id)}")
        if node.id in ("true", "false"):
            value = node.id == "true"
            return lambda ctx: value
        raise _fail(node, f"unknown name {node.id!r}; use {', '.join(ROOTS)}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise _fail(node, "only plain calls of " + ", ".join([*FUNCTIONS, *WINDOW_FUNCTIONS]))
        name = node.func.id
        if name in WINDOW_FUNCTIONS:
            if len(node.args) != 2 or not all(isinstance(a, ast.Constant) and
                                              isinstance(a.value, str) for a in node.args):
                raise _fail(node, f'{name}("field", "duration"), e.g. {name}("lux", "5m")')
            field, span = node.args[0].value, node.args[1].value
            try:
                seconds = parse_duration(span)
            except ValueError as e:
                raise _fail(node.args[1], str(e)) from None
            windows.append((field, seconds))
            kind = name.removesuffix("_over")
            return lambda ctx: ctx.window(kind, field, seconds)
        if name not in FUNCTIONS:
            raise _fail(node, f"unknown function {name!r}; allowed: "
                        + ", ".join([*FUNCTIONS, *WINDOW_FUNCTIONS]))
        fn = FUNCTIONS[name]
        args = [_compile(a, windows) for a in node.args]
        return lambda ctx: fn(*(a(ctx) for a in args))
    raise _fail(node, f"{type(node).__name__} is not allowed in a rule expression")


def _example(root: str) -> str:
    return {"reading": "lux", "device": "district", "light": "level", "sun": "elevation",
            "local": "hour", "meter": "unbilled_kwh"}[root]
