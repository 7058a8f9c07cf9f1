"""The rule condition language: a small, safe subset of Python expressions.

Rule text is parsed with :mod:`ast` (parsing runs nothing) and checked against a
whitelist: literals, ``and``/``or``/``not``, comparisons, arithmetic, a few names
(``reading``, ``device``, ``light``, ``sun``, ``local``) with their attributes, and a
few functions. Nothing else is accepted — no imports, subscripts, lambdas,
comprehensions, dunder attributes or calls of anything not listed — so a rule cannot
reach the file system or the network.

What passed the check is compiled once, at load, into one Python function (generated
from the checked tree only: names, attributes and constants it contains come from the
whitelist or are literals), so evaluating a condition is one call, not a call per node.
The closures the check builds on the way (:func:`interpret`) evaluate the same thing
node by node; they are the reference the generated code is tested against, and what an
expression too deeply nested for Python's compiler falls back to.

Examples::

    reading.motion and sun.elevation < -4
    reading.power_w < 0.1 * device.rated_w and light.level > 0
    avg_over("no2_ugm3", "15m") > 200
    local.hour >= 23 or local.hour < 5
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from citygrid.fleet import FleetDevice

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
    # Takes the evaluation context (rules/context.py's Context). A compiled expression's
    # raises only EvalError: a bad type, a division by zero … already say so.
    evaluate: Callable[[Any], Any]
    windows: tuple[tuple[str, float], ...]  # (field, seconds) the expression looks back over
    # The names it looks up, as "root.attr" ("reading.lux", "light.level"), and the window
    # functions as "window.field".
    names: frozenset[str] = field(default=frozenset(), compare=False)

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
    _compile(tree.body, windows)  # the check (raises ExprError), and the reference closures
    source = source.strip()
    generated = _Generator(source)
    try:
        fn = generated.function(tree.body)
    except (SyntaxError, RecursionError, MemoryError):  # nested past what compile() takes
        fn = _checked(_compile(tree.body, []), source)
    return Expression(source, fn, tuple(windows), frozenset(generated.names))


def interpret(source: str) -> Callable[[Any], Any]:
    """The expression as closures, node by node (the reference for the generated code); it
    raises what the operations raise, as ``Expression.__call__`` translates them."""
    return _compile(ast.parse(source.strip(), mode="eval").body, [])


def _checked(fn: Callable[[Any], Any], source: str) -> Callable[[Any], Any]:
    def evaluate(ctx: Any) -> Any:
        try:
            return fn(ctx)
        except (TypeError, ZeroDivisionError, ValueError) as e:
            raise EvalError(f"{source!r}: {e}") from None

    return evaluate


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


# --------------------------------------------------------------------------- code generation
# From a tree _compile accepted. Every construct keeps the closures' meaning exactly:
# ``and``/``or`` give True or False (as all()/any() did), a comparison with an unknown
# (None) side is False after both sides were evaluated, a chain stops at its first false
# link, lookups raise EvalError where Context.lookup does, and what an operation raises
# (TypeError, ZeroDivisionError, ValueError) becomes EvalError with the same message.

_DEVICE_FIELDS = frozenset(f.name for f in dataclasses.fields(FleetDevice))
_OPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
        ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Mod: "%"}
_EMPTY: dict = {}


def _literal(node: ast.AST) -> bool:
    """A constant that is not None (a number, possibly negated, a string, true/false)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
        return isinstance(node, ast.Constant) and isinstance(node.value, int | float)
    if isinstance(node, ast.Name):
        return node.id in ("true", "false")
    return isinstance(node, ast.Constant) and node.value is not None


def _no_reading() -> Any:
    raise EvalError("no reading here")


def _no_device() -> Any:
    raise EvalError("no device here")


class _Generator:
    def __init__(self, source: str):
        self.source = source
        self.names: set[str] = set()
        self.consts: dict[str, Any] = {}
        self.temps = 0

    def temp(self) -> str:
        self.temps += 1
        return f"_t{self.temps}"

    def function(self, node: ast.AST) -> Callable[[Any], Any]:
        body = self.expr(node)
        params = ", ".join(["_src", *self.consts])
        text = (f"def _make({params}):\n"
                "    def evaluate(ctx):\n"
                "        try:\n"
                f"            return {body}\n"
                "        except (TypeError, ZeroDivisionError, ValueError) as e:\n"
                "            raise EvalError(f'{_src!r}: {e}') from None\n"
                "    return evaluate\n")
        scope = {"EvalError": EvalError, "_no_reading": _no_reading, "_no_device": _no_device,
                 "_EMPTY": _EMPTY, **{f"_f_{k}": v for k, v in FUNCTIONS.items()}}
        exec(compile(text, f"<rule expression {self.source!r}>", "exec"), scope)  # noqa: S102
        return scope["_make"](self.source, *self.consts.values())

    def const(self, value: Any) -> str:
        if value is None or isinstance(value, bool | str) or (
                isinstance(value, int | float) and math.isfinite(value)):
            return f"({value!r})"  # a literal Python reads back as the same value
        name = f"_k{len(self.consts)}"
        self.consts[name] = value
        return name

    def expr(self, node: ast.AST) -> str:  # noqa: C901
        if isinstance(node, ast.Constant):
            return self.const(node.value)
        if isinstance(node, ast.BoolOp):
            joiner = " and " if isinstance(node.op, ast.And) else " or "
            return f"(True if ({joiner.join(self.expr(v) for v in node.values)}) else False)"
        if isinstance(node, ast.UnaryOp):
            return f"({'not ' if isinstance(node.op, ast.Not) else '-'}{self.expr(node.operand)})"
        if isinstance(node, ast.BinOp):
            return f"({self.expr(node.left)} {_OPS[type(node.op)]} {self.expr(node.right)})"
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.IfExp):
            return (f"({self.expr(node.body)} if {self.expr(node.test)} "
                    f"else {self.expr(node.orelse)})")
        if isinstance(node, ast.Attribute):
            return self.lookup(node.value.id, node.attr)
        if isinstance(node, ast.Name):  # true / false
            return "True" if node.id == "true" else "False"
        if isinstance(node, ast.Call):
            name = node.func.id
            if name in WINDOW_FUNCTIONS:
                field_name, span = node.args[0].value, node.args[1].value
                self.names.add(f"window.{field_name}")
                return (f"ctx.window({name.removesuffix('_over')!r}, {field_name!r}, "
                        f"{self.const(parse_duration(span))})")
            return f"_f_{name}({', '.join(self.expr(a) for a in node.args)})"
        raise ExprError(f"{type(node).__name__} is not allowed in a rule expression")

    def compare(self, node: ast.Compare) -> str:
        """``a < b < c``: each side evaluated once, in order, the right one before the None
        check; a None side or a false link ends it False. A literal side is never None."""
        sides = [node.left, *node.comparators]
        codes = [self.expr(n) for n in sides]
        literal = [_literal(n) for n in sides]
        values = [code if lit else self.temp() for code, lit in zip(codes, literal,
                                                                     strict=True)]

        def is_none(i: int) -> str | None:
            return None if literal[i] else f"(({values[i]} := {codes[i]}) is None)"

        tail = None
        for i in range(len(node.ops) - 1, -1, -1):  # from the last link back
            test = f"({values[i]} {_OPS[type(node.ops[i])]} {values[i + 1]})"
            if tail is not None:
                test = f"({test} and {tail})"
            checks = [c for c in ((is_none(0), is_none(1)) if i == 0 else (is_none(i + 1),))
                      if c]
            tail = f"(False if {' | '.join(checks)} else {test})" if checks else test
        return tail

    def lookup(self, root: str, attr: str) -> str:
        self.names.add(f"{root}.{attr}")
        if root == "reading":
            r = self.temp()
            return f"(({r}) if ({r} := ctx.reading) is not None else _no_reading()).get({attr!r})"
        if root == "device" and (attr == "id" or attr in _DEVICE_FIELDS):
            d = self.temp()
            name = "device_id" if attr == "id" else attr
            return f"(({d}) if ({d} := ctx.device) is not None else _no_device()).{name}"
        if root == "light" and attr == "level":
            s = self.temp()
            return (f"({s}.level if ({s} := ctx.light) is not None and {s}.level is not None "
                    "else (ctx.reading or _EMPTY).get('brightness_pct'))")
        if root == "sun" and attr == "elevation":
            return "ctx.sun_elevation()"
        return f"ctx.lookup({root!r}, {attr!r})"  # local.*, meter.*, and what raises
