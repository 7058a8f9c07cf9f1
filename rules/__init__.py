"""Rule engine: YAML rules that dim streetlights (arbitrated like TALQ), raise alerts and
settle bills; tools for rule authors; read functions over the state `rules run` saves; the
topic filters the rules service publishes to (its broker ACL)."""

from rules.acl import PUBLISH_FILTERS, SERVICE_FILTERS
from rules.cli import add_parsers
from rules.loader import DEFAULT_RULES, RuleFileError, RuleSet, load, parse_text
from rules.state import (
    AlertRow,
    LampRow,
    LightRow,
    RuleHealthRow,
    engine_from_state,
    read_alerts,
    read_health,
    read_lamps,
    read_lights,
    read_reload_error,
    read_running,
)

__all__ = ["DEFAULT_RULES", "PUBLISH_FILTERS", "AlertRow", "LampRow", "LightRow", "RuleFileError",
           "RuleHealthRow", "RuleSet", "SERVICE_FILTERS", "add_parsers", "engine_from_state",
           "load", "parse_text", "read_alerts", "read_health", "read_lamps", "read_lights",
           "read_reload_error", "read_running"]
