"""docker-compose.yml and the Dockerfile, tested without a Docker engine (none runs here):
the compose file is valid Compose, every CityGrid command in it parses, every setting it
sets exists, every file it mounts or reads exists."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import fields

import jsonschema
import pytest
import yaml

from cityctl.cli import build_parser
from citygrid.settings import Settings
from tests.helpers import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((REPO / "tests/data/compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(COMPOSE)


def test_the_services_a_city_needs_are_there_with_healthchecks_and_restarts():
    assert {"mosquitto", "influxdb", "grafana", "ingest", "rules", "gateway", "adapters",
            "simulator"} <= set(SERVICES)
    for name, service in SERVICES.items():
        if name == "setup":
            continue
        assert "healthcheck" in service or name == "simulator", name
        assert service.get("restart") == "unless-stopped", name
    for name in ("ingest", "rules", "gateway", "adapters"):
        assert SERVICES[name]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert SERVICES["simulator"]["profiles"] == ["simulator"]
    assert set(COMPOSE["volumes"]) >= {"citygrid-state", "influxdb-data", "grafana-data"}


def _citygrid_commands(text: str) -> list[list[str]]:
    text = re.sub(r"\$\$\([^)]*\)", "x", text).replace("$$s", "ingest")
    commands = []
    for match in re.finditer(r"(?<![-\w])citygrid ([^;&|]+)", text):
        argv = shlex.split(match[1])
        argv = [a for a in argv if not a.startswith("CITYGRID_")]
        if argv and argv[0].startswith("citygrid-"):
            continue  # an account name, not a command
        commands.append(argv)
    return commands


@pytest.mark.parametrize("name", [n for n, s in SERVICES.items() if s.get("image") ==
                                  "citygrid:latest" or s.get("build")])
def test_every_citygrid_command_in_compose_parses(name):
    service = SERVICES[name]
    command = service.get("command")
    text = " ".join(command) if isinstance(command, list) else str(command or "")
    commands = _citygrid_commands(text)
    healthcheck = service.get("healthcheck", {}).get("test", [])
    if healthcheck[:2] == ["CMD", "citygrid"]:
        commands.append(healthcheck[2:])
    assert commands, name
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # SystemExit (a failure) for an unknown command or flag


def test_every_setting_compose_sets_is_one_citygrid_reads():
    known = {"CITYGRID_" + f.name.upper() for f in fields(Settings) if f.init}
    env: dict[str, str] = {}
    for service in SERVICES.values():
        env.update(service.get("environment") or {})
    for example in (REPO / "deploy").glob("*.env.example"):
        for line in example.read_text().splitlines():
            line = line.lstrip("# ").strip()
            if "=" in line and line.split("=")[0].isupper():
                env[line.split("=")[0]] = line.split("=", 1)[1]
    citygrid = {k for k in env if k.startswith("CITYGRID_")}
    assert citygrid and citygrid <= known, citygrid - known
    assert all(k.startswith(("CITYGRID_", "GF_", "INFLUXDB_")) for k in env), env


def test_every_mounted_or_read_file_exists():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), (name, source)
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            assert (REPO / env_file).exists() or (REPO / f"{env_file}.example").exists(), (
                name, env_file)
    dockerfile = (REPO / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert (REPO / source).exists(), source
    assert "ENTRYPOINT [\"citygrid\"]" in dockerfile and "USER citygrid" in dockerfile


def test_grafana_gets_the_dashboards_and_their_provisioning():
    mounts = {v.split(":")[0]: v.split(":")[1] for v in SERVICES["grafana"]["volumes"]
              if v.startswith(".")}
    assert mounts["./dashboards/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((REPO / "dashboards/provisioning/dashboards/citygrid.yaml")
                              .read_text())["providers"][0]
    assert mounts["./dashboards/json"] == provider["options"]["path"]
    assert len(list((REPO / "dashboards/json").glob("*.json"))) == 5  # with maintenance
