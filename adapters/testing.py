"""`citygrid adapters test FILE`: profile tests in YAML, like `citygrid rules test`.

Native messages in, the expected contract readings, acks and status out; contract
commands in, the expected native messages out. Each case starts with a fresh profile (no
aliases, nothing to merge); its messages run in order. Paths are relative to the test file.

    profile: tasmota-energy            # a shipped profile's name, or a path to a .yaml
    cases:
      - name: the documented SENSOR message
        messages:
          - topic: tele/plug-7/SENSOR
            payload_file: ../../tests/data/vendors/tasmota/tele-SENSOR-energy.json
            at: 2018-01-17T18:00:00Z          # when the adapter receives it
            expect:
              native_id: plug-7
              readings: [{ts: 2018-01-17T17:59:50Z, energy_kwh: 1.956, power_w: 9}]
          - topic: tele/plug-7/SENSOR
            payload: "not json"               # a string is sent as it is, a mapping as JSON
            expect: {error: not_json}
        commands:
          - native_id: bulb-1
            command: {id: c1, ts: 2026-01-01T00:00:00Z, brightness_pct: 40, reason: rule:x}
            expect: [{topic: zigbee2mqtt/bulb-1/set, payload: {state: "ON", brightness: 102}}]

A reading or ack matches when every field given is equal (numbers within 1e-6; ``ts`` may be
an RFC 3339 time); readings not listed fail the case unless ``readings_at_least: true``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from adapters.profile import SHIPPED, DecodeError, Profile, load_profile
from citygrid.casefiles import CaseResult
from citygrid.yamlconf import ConfigError, ConfigProblem, parse, validate

_FORBID = ConfigDict(extra="forbid")


class Expect(BaseModel):
    model_config = _FORBID
    native_id: str | None = None
    readings: list[dict[str, Any]] | None = None
    readings_at_least: bool = False
    acks: list[dict[str, Any]] | None = None
    status: str | None = None
    affected: list[str] | None = None
    state: dict[str, Any] | None = None
    held: bool | None = None
    error: str | None = None


class NativeMessage(BaseModel):
    model_config = _FORBID
    topic: str
    payload: Any = None
    payload_file: str | None = None
    at: datetime | None = None
    pending: dict[str, Any] | None = None
    expect: Expect = Expect()


class CommandCase(BaseModel):
    model_config = _FORBID
    native_id: str
    command: dict[str, Any]
    expect: list[dict[str, Any]] | None = None
    error: str | None = None


class Case(BaseModel):
    model_config = _FORBID
    name: str
    messages: list[NativeMessage] = []
    commands: list[CommandCase] = []


class TestFile(BaseModel):
    model_config = _FORBID
    profile: str
    cases: list[Case]


class TestFileError(ValueError):
    """A test file that cannot be run (exit 2)."""




def _ms(value: Any) -> Any:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return value
        if parsed.tzinfo is not None:
            return int(parsed.timestamp() * 1000)
    return value


def _equal(want: Any, got: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return want is got
    if isinstance(want, int | float) and isinstance(got, int | float):
        return abs(want - got) <= 1e-6 * max(1.0, abs(want))
    if isinstance(want, dict) and isinstance(got, dict):
        return want.keys() == got.keys() and all(_equal(v, got[k]) for k, v in want.items())
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(_equal(a, b) for a, b in zip(want, got,
                                                                          strict=True))
    return want == got


def _subset(want: dict[str, Any], got: dict[str, Any]) -> bool:
    return all(k in got and _equal(_ms(v) if k == "ts" else v, got[k]) for k, v in want.items())


def _compare(what: str, want: list[dict], got: list[dict], at_least: bool) -> list[str]:
    remaining, failures = list(got), []
    for w in want:
        for i, g in enumerate(remaining):
            if _subset(w, g):
                del remaining[i]
                break
        else:
            failures.append(f"    missing {what}: {w}")
    if not at_least:
        failures += [f"    unexpected {what}: {g}" for g in remaining]
    if failures:
        failures.append(f"    all {what}s: {got or '(none)'}")
    return failures


def _payload(msg: NativeMessage, base: Path) -> bytes:
    if msg.payload_file is not None:
        try:
            return (base / msg.payload_file).read_bytes()
        except OSError as e:
            raise TestFileError(f"payload_file {msg.payload_file}: {e}") from None
    if isinstance(msg.payload, str):
        return msg.payload.encode()
    return orjson.dumps(msg.payload)


def _profile(ref: str, base: Path) -> Profile:
    path = base / ref if ref.endswith((".yaml", ".yml")) else SHIPPED / f"{ref}.yaml"
    if not path.exists():
        raise TestFileError(f"profile {ref!r}: no {path}")
    return load_profile(path)


def load_test_file(path: str | Path) -> TestFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TestFileError(f"{path}: {e}") from None
    data, marks = parse(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(str(path), 1, 1, "a test file is a mapping with "
                                         "'profile:' and 'cases:'")])
    return validate(TestFile, data, marks, str(path))  # type: ignore[return-value]


def run_file(path: str | Path) -> list[CaseResult]:
    """Run one test file; raises ConfigError / ProfileError / TestFileError if it cannot."""
    path = Path(path)
    doc = load_test_file(path)
    base = path.parent
    _profile(doc.profile, base)  # a profile that does not load stops the file (exit 2)
    results = []
    for case in doc.cases:
        profile = _profile(doc.profile, base)  # fresh memory per case
        result = CaseResult(case.name)
        for i, msg in enumerate(case.messages):
            result.failures += _run_message(profile, msg, base, f"  messages[{i}] {msg.topic}")
        for i, cmd in enumerate(case.commands):
            result.failures += _run_command(profile, cmd, f"  commands[{i}] {cmd.native_id}")
        results.append(result)
    return results


def _run_message(profile: Profile, msg: NativeMessage, base: Path, where: str) -> list[str]:
    exp = msg.expect
    now_ms = int(msg.at.timestamp() * 1000) if msg.at else 1_800_000_000_000
    pending = dict(msg.pending) if msg.pending else None
    if pending and "ts" in pending:
        pending["ts"] = _ms(pending["ts"])
    try:
        out = profile.decode(msg.topic, _payload(msg, base), now_ms, pending=pending)
    except DecodeError as e:
        if exp.error == e.reason:
            return []
        return [f"{where}: unexpected DecodeError {e}"]
    failures: list[str] = []
    if exp.error is not None:
        return [f"{where}: expected DecodeError {exp.error}, got {out}"]
    if exp.native_id is not None and out.native_id != exp.native_id:
        failures.append(f"    native_id: expected {exp.native_id!r}, got {out.native_id!r}")
    if exp.status is not None and out.status != exp.status:
        failures.append(f"    status: expected {exp.status!r}, got {out.status!r}")
    if exp.affected is not None and sorted(out.affected) != sorted(exp.affected):
        failures.append(f"    affected: expected {exp.affected}, got {out.affected}")
    if exp.state is not None and not _subset(exp.state, out.state):
        failures.append(f"    state: expected {exp.state}, got {out.state}")
    if exp.held is not None and (out.held is not None) != exp.held:
        failures.append(f"    held: expected {exp.held}, got {out.held!r}")
    if exp.readings is not None:
        failures += _compare("reading", exp.readings, out.readings, exp.readings_at_least)
    if exp.acks is not None:
        failures += _compare("ack", exp.acks, out.acks, False)
    return [f"{where}:", *failures] if failures else []


def _run_command(profile: Profile, cmd: CommandCase, where: str) -> list[str]:
    command = {k: (_ms(v) if k == "ts" else v) for k, v in cmd.command.items()}
    try:
        out = profile.encode_command(cmd.native_id, command)
    except (DecodeError, ValueError) as e:
        if cmd.error is not None and getattr(e, "reason", "value_error") == cmd.error:
            return []
        return [f"{where}: unexpected error {e}"]
    if cmd.error is not None:
        return [f"{where}: expected error {cmd.error}, got {out}"]
    got = []
    for topic, payload in out:
        try:
            body: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            body = payload.hex()
        got.append({"topic": topic, "payload": body})
    if cmd.expect is not None:
        failures = _compare("native message", cmd.expect, got, False)
        return [f"{where}:", *failures] if failures else []
    return []
