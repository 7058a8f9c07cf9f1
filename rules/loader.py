"""Load rule files: every error at once, each with file:line:column and what was expected."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from citygrid.yamlconf import ConfigError as RuleFileError
from citygrid.yamlconf import ConfigProblem as RuleProblem
from citygrid.yamlconf import Marks, dedupe, located, parse
from rules.calendar import Calendar, compile_calendar
from rules.expr import ExprError, Expression, compile_expression, parse_duration
from rules.model import Rule, RuleFile, Settings

EXAMPLES = Path(__file__).parent / "examples"
DEFAULT_RULES = EXAMPLES / "copenhagen.yaml"


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    condition: Expression | None
    clear: Expression | None
    for_s: float
    fingerprint: str  # changes when the rule's text changes: unchanged rules keep their state

    @property
    def id(self) -> str:
        return self.rule.id


@dataclass(frozen=True)
class RuleSet:
    settings: Settings
    rules: tuple[CompiledRule, ...]
    floor_when: Expression
    sources: tuple[str, ...] = field(default=())
    calendar: Calendar = field(default=Calendar())  # lighting calendars (rules/calendar.py)

    def by_id(self, rule_id: str) -> CompiledRule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    @property
    def command_expiry_s(self) -> float:
        return parse_duration(self.settings.command_expiry)

    @property
    def ack_timeout_s(self) -> float:
        return parse_duration(self.settings.ack_timeout)


# --------------------------------------------------------------------------- loading


def parse_text(text: str, name: str = "<rules>") -> RuleSet:
    """Parse one rule file's text; raises :class:`RuleFileError` with every problem."""
    data, marks = parse(text, name)
    if not isinstance(data, dict):
        raise RuleFileError([RuleProblem(name, 1, 1, "a rule file is a mapping with 'rules:'")])
    problems: list[RuleProblem] = []
    try:
        model = RuleFile.model_validate(data)
    except ValidationError as e:
        problems = located(e, marks, name)
        raw_rules = data.get("rules") if isinstance(data.get("rules"), list) else []
        for i, raw in enumerate(raw_rules):  # the expressions too: every error at once
            if isinstance(raw, dict):
                _compile_rule_exprs(raw, i, str(raw.get("id")), name, marks, problems)
        problems += _calendar_problems(data, name, marks)
        problems.sort(key=lambda p: (p.line, p.column))
        raise RuleFileError(dedupe(problems)) from None

    problems += _calendar_problems(data, name, marks)
    compiled: list[CompiledRule] = []
    for i, rule in enumerate(model.rules):
        exprs = _compile_rule_exprs(data["rules"][i], i, rule.id, name, marks, problems)
        if rule.when.reading is None and (rule.if_ or rule.clear_if) and any(
                root in (rule.if_ or "") + (rule.clear_if or "") for root in ("reading.",)):
            line, col = marks.at(("rules", i, "if"))
            problems.append(RuleProblem(name, line, col, f"rules[{i}] ({rule.id}): 'reading' is "
                                        "only known to rules triggered by readings"))
        if rule.clear_if and not rule.if_:
            line, col = marks.at(("rules", i, "clear_if"))
            problems.append(RuleProblem(name, line, col,
                                        f"rules[{i}] ({rule.id}): clear_if needs an if"))
        fingerprint = hashlib.sha256(rule.model_dump_json(by_alias=True).encode()).hexdigest()
        compiled.append(CompiledRule(rule, exprs["if"], exprs["clear_if"],
                                     parse_duration(rule.for_) if rule.for_ else 0.0,
                                     fingerprint[:16]))
    try:
        floor_when = compile_expression(model.settings.safety_floor.when)
    except ExprError as e:
        line, col = marks.at(("settings", "safety_floor", "when"))
        problems.append(RuleProblem(name, line, col + e.offset, f"settings.safety_floor.when: {e}"))
        floor_when = compile_expression("false")
    if problems:
        raise RuleFileError(problems)
    return RuleSet(model.settings, tuple(compiled), floor_when, (name,),
                   compile_calendar(model.calendar, model.programs, name))


def _calendar_problems(data: dict, name: str, marks: Marks) -> list[RuleProblem]:
    """What the schema cannot see in a calendar: programs it names that `programs:` lacks,
    and an entry name used twice."""
    problems = []
    programs = data.get("programs") if isinstance(data.get("programs"), dict) else {}
    entries = data.get("calendar") if isinstance(data.get("calendar"), list) else []
    seen: set[str] = set()
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            continue
        program = raw.get("program")
        if isinstance(program, str) and program not in programs:
            line, col = marks.at(("calendar", i, "program"))
            known = f"; programs: {', '.join(map(str, programs))}" if programs else \
                " (there is no programs: section)"
            problems.append(RuleProblem(name, line, col, f"calendar[{i}] ({raw.get('name')}): "
                                        f"unknown program {program!r}{known}"))
        entry = raw.get("name")
        if isinstance(entry, str):
            if entry in seen:
                line, col = marks.at(("calendar", i, "name"))
                problems.append(RuleProblem(name, line, col,
                                            f"calendar[{i}]: entry name {entry!r} is used twice"))
            seen.add(entry)
    return problems


def _compile_rule_exprs(raw: dict, i: int, rule_id: str, name: str, marks: Marks,
                        problems: list[RuleProblem]) -> dict[str, Expression | None]:
    exprs: dict[str, Expression | None] = {}
    for key in ("if", "clear_if"):
        text_value = raw.get(key)
        exprs[key] = None
        if text_value is None:
            continue
        try:
            exprs[key] = compile_expression(str(text_value))
        except ExprError as e:
            line, col, quoted = marks.values.get(("rules", i, key), (1, 1, False))
            problems.append(RuleProblem(name, line, col + e.offset + (1 if quoted else 0),
                                        f"rules[{i}] ({rule_id}).{key}: {e}"))
    return exprs


def rule_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")
                      and not p.stem.endswith("_test"))
    return [path]


def load(path: str | Path | None = None) -> RuleSet:
    """Load a rule file or a folder of them (``*_test.yaml`` are tests, not rules)."""
    files = rule_files(path or DEFAULT_RULES)
    if not files:
        raise RuleFileError([RuleProblem(str(path), 1, 1, "no .yaml rule files here")])
    problems: list[RuleProblem] = []
    sets: list[RuleSet] = []
    for f in files:
        try:
            sets.append(parse_text(f.read_text(), str(f)))
        except OSError as e:
            problems.append(RuleProblem(str(f), 1, 1, f"cannot read: {e}"))
        except RuleFileError as e:
            problems += e.problems
    if problems:
        raise RuleFileError(problems)
    if len(sets) == 1:
        return sets[0]
    ids: dict[str, str] = {}
    for s in sets:
        for r in s.rules:
            if r.id in ids:
                problems.append(RuleProblem(s.sources[0], 1, 1,
                                            f"rule id {r.id!r} is also in {ids[r.id]}"))
            ids[r.id] = s.sources[0]
    if problems:
        raise RuleFileError(problems)
    entries: dict[str, str] = {}
    for s in sets:
        for e in s.calendar.entries:
            if e.name in entries:
                problems.append(RuleProblem(s.sources[0], 1, 1, f"calendar entry {e.name!r} is "
                                            f"also in {entries[e.name]}"))
            entries[e.name] = s.sources[0]
    if problems:
        raise RuleFileError(problems)
    first = sets[0]
    return RuleSet(first.settings, tuple(r for s in sets for r in s.rules), first.floor_when,
                   tuple(x for s in sets for x in s.sources),
                   Calendar(tuple(e for s in sets for e in s.calendar.entries)))


def schema() -> dict[str, Any]:
    """JSON Schema of a rule file, for editors."""
    doc = RuleFile.model_json_schema(by_alias=True)
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "CityGrid rule file"
    return doc
