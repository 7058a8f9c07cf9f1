"""Rules: the running rules with their health, and checking a rule file before applying it."""

from fastapi import APIRouter

from gateway import queries
from gateway.deps import AUTH_ERRORS, Operator, SettingsDep, Viewer
from gateway.models import RuleHealthOut, RuleText, RuleValidation
from rules import RuleFileError, parse_text

router = APIRouter(tags=["rules"], responses=AUTH_ERRORS)


@router.get("/api/v1/rules", response_model=list[RuleHealthOut])
def rules(_: Viewer, settings: SettingsDep) -> list[RuleHealthOut]:
    """The running rules with their health."""
    return queries.rule_health(settings)


@router.post("/api/v1/rules/validate", response_model=RuleValidation)
def validate_rules(body: RuleText, _: Operator) -> RuleValidation:
    """Check a rule file without applying it: every problem with line and column."""
    try:
        ruleset = parse_text(body.text, body.name)
    except RuleFileError as e:
        return RuleValidation(ok=False, problems=[str(p) for p in e.problems])
    return RuleValidation(ok=True, rules=[r.id for r in ruleset.rules])
