"""``publish``: an MQTT message when the rule fires, topic and payload filled in from the
reading and device. The broker drops what falls outside the rules service's ACL
(rules/acl.py; ``citygrid rules check`` says so)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from rules.actions import ActionType, register
from rules.context import Context, render
from rules.model import Publish

if TYPE_CHECKING:
    from rules.loader import CompiledRule


@register("publish")
class PublishAction(ActionType):
    def activate(self, rule: CompiledRule, source: str, spec: Publish, ctx: Context) -> None:
        body = spec.payload if isinstance(spec.payload, str) else json.dumps(spec.payload)
        self.engine.outbox.publish(render(spec.topic, ctx), render(body, ctx).encode(), spec.qos,
                                   spec.retain)
