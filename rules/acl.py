"""The rules service's broker ACL: the topic filters it may publish to.

A message published outside them is dropped by the broker without a word to the publisher,
so ``citygrid rules check`` refuses a ``publish`` action whose topic can never match them.
The gateway's broker provisioning takes its ACL from here (rules sits below the gateway).
"""

from __future__ import annotations

import re
from pathlib import Path

from billing import HEAD_TOPIC
from citygrid.yamlconf import ConfigError, parse
from rules.context import TEMPLATE
from rules.loader import RuleProblem, rule_files

# Commands to streetlights; settlements of meters (the `settle` action).
PUBLISH_FILTERS = ("city/v1/+/+/+/cmd", "city/v1/+/+/+/settlement")
# What the service publishes besides: the ledger's head (docs/ledger-anchoring.md). Not open to
# rules' `publish` actions — a rule must not be able to forge an anchor.
SERVICE_FILTERS = (*PUBLISH_FILTERS, HEAD_TOPIC)


def _level(template_level: str) -> re.Pattern:
    """One level of a topic template as a pattern: its placeholders stand for any text of
    one level (device ids, districts and kinds are single topic levels by the contract)."""
    parts = TEMPLATE.split(template_level)  # literal, root, attr, literal, root, attr, …
    return re.compile("[^/]*".join(re.escape(p) for p in parts[::3]))


def can_match(topic: str, topic_filter: str) -> bool:
    """Can the topic (a template with ``{device.id}`` and the like) match the MQTT filter?"""
    levels = topic.split("/")
    filters = topic_filter.split("/")
    for i, f in enumerate(filters):
        if f == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(levels):
            return False
        if f == "+":
            if i == 0 and topic.startswith("$"):
                return False
            continue
        if not _level(levels[i]).fullmatch(f):
            return False
    return len(levels) == len(filters)


def publishable(topic: str, filters: tuple[str, ...] = PUBLISH_FILTERS) -> bool:
    return any(can_match(topic, f) for f in filters)


def acl_problems(path: str | Path, filters: tuple[str, ...] = PUBLISH_FILTERS
                 ) -> list[RuleProblem]:
    """Each ``publish`` action in the rule file(s) at ``path`` whose topic the broker would
    drop, with its file:line:column. Files that do not read or parse are skipped (loading
    them reports why)."""
    problems = []
    for f in rule_files(path):
        try:
            data, marks = parse(f.read_text(), str(f))
        except (OSError, ConfigError):
            continue
        rules = data.get("rules") if isinstance(data, dict) else None
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            then = rule.get("then") if isinstance(rule, dict) else None
            for j, action in enumerate(then if isinstance(then, list) else []):
                publish = action.get("publish") if isinstance(action, dict) else None
                topic = publish.get("topic") if isinstance(publish, dict) else None
                if not isinstance(topic, str) or not topic or publishable(topic, filters):
                    continue
                line, col = marks.at(("rules", i, "then", j, "publish", "topic"))
                problems.append(RuleProblem(
                    str(f), line, col,
                    f"rules[{i}] ({rule.get('id')}).then[{j}].publish.topic: {topic!r} is "
                    f"outside the rules service's broker ACL ({', '.join(filters)}): the "
                    "broker will drop every message this action publishes"))
    return problems
