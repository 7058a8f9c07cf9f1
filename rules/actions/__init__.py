"""What a rule does when it fires: one registered class per action, named by its key under a
rule's ``then:`` (``set_light``, ``alert``, ``publish``, ``settle``), in its own module.

An action class gets the engine it works for, and is called when its rule becomes active
(:meth:`ActionType.activate`), while it stays active (:meth:`ActionType.refresh`, e.g. a
held light starts its hold again) and when it clears (:meth:`ActionType.deactivate`). A new
action is a new module here with a ``@register("name")`` class (and its schema in
rules/model.py's ``Action``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from citygrid.fleet import FleetDevice

if TYPE_CHECKING:
    from rules.context import Context
    from rules.engine import RuleEngine
    from rules.loader import CompiledRule


class ActionType:
    name: ClassVar[str] = ""

    def __init__(self, engine: RuleEngine):
        self.engine = engine

    def activate(self, rule: CompiledRule, source: str, spec: Any, ctx: Context) -> None:
        raise NotImplementedError

    def refresh(self, rule: CompiledRule, source: str, spec: Any, ctx: Context) -> None:
        """The rule held again while active: nothing, unless the action says otherwise."""

    def deactivate(self, rule: CompiledRule, source: str, spec: Any,
                   device: FleetDevice | None, now_ms: int) -> None:
        """The rule cleared: nothing, unless the action says otherwise."""

    def refreshes(self, spec: Any) -> bool:
        """Does :meth:`refresh` do anything for this action's ``spec``? (Asked once per rule
        load, so the engine calls only what acts.)"""
        return type(self).refresh is not ActionType.refresh

    def deactivates(self, spec: Any) -> bool:
        return type(self).deactivate is not ActionType.deactivate


ACTIONS: dict[str, type[ActionType]] = {}


def register(name: str) -> Callable[[type[ActionType]], type[ActionType]]:
    """Class decorator: the action for ``then: [{name: …}]``."""

    def add(cls: type[ActionType]) -> type[ActionType]:
        if name in ACTIONS:
            raise ValueError(f"action {name!r} is registered twice")
        cls.name = name
        ACTIONS[name] = cls
        return cls

    return add


Step = tuple[Callable[..., None], Any]  # a bound action method and the action's spec


class Plan(NamedTuple):
    """A rule's actions, ready to call: in the rule's order, only those that act."""

    activate: tuple[Step, ...]
    refresh: tuple[Step, ...]
    deactivate: tuple[Step, ...]


def plan(rule: CompiledRule, actions: dict[str, ActionType],
         only: Collection[str] | None = None) -> Plan:
    """``only``: just these actions (an engine that owns some districts runs only the
    ``set_light`` of a rule for a device it does not own)."""
    steps = []
    for action in rule.rule.then:
        [(name, spec)] = [(k, v) for k, v in action if v is not None]  # the model: one each
        if only is None or name in only:
            steps.append((actions[name], spec))
    return Plan(tuple((a.activate, spec) for a, spec in steps),
                tuple((a.refresh, spec) for a, spec in steps if a.refreshes(spec)),
                tuple((a.deactivate, spec) for a, spec in steps if a.deactivates(spec)))


# The actions register themselves on import.
from rules.actions import alert, publish, set_light, settle  # noqa: E402, F401, I001
