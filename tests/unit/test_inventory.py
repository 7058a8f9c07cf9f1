"""Every way into the registry gives the same clear errors: `citygrid devices add|import|edit`
(in process, through the command line's own entry point), the registry itself."""

from __future__ import annotations

import json
import math

import pytest

from cityctl.cli import main
from citygrid.fleet import Fleet, FleetDevice, check_device
from citygrid.registry import Catalogue, InvalidEntry, Registry

LIGHT = ["--kind", "streetlight", "--district", "norrebro", "--lat", "55.7", "--lon", "12.5",
         "--rated-w", "50"]


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CITYGRID_BILLING", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--data-dir", str(tmp_path)])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def with_option(option: str, value: str) -> list[str]:
    args = list(LIGHT)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--lat", "555", "lat: 555.0 is outside -90…90"),
    ("--lat", "nan", "lat: must be a finite number, not nan"),
    ("--lon", "inf", "lon: must be a finite number, not inf"),
    ("--rated-w", "-40", "rated_w: Input should be greater than 0"),
    ("--district", "nørrebro", "district"),
])
def test_devices_add_refuses_what_does_not_fit_and_says_what(cli, option, value, says):
    code, out, err = cli("devices", "add", "sl-1", *with_option(option, value))
    assert code == 2 and says in err, err
    assert "password" not in out
    assert cli("devices", "list")[1] == ""  # nothing half-registered


def test_a_meter_needs_a_tariff_the_billing_configuration_knows(cli):
    meter = ["--kind", "meter", "--district", "norrebro", "--lat", "55.7", "--lon", "12.5",
             "--account", "acc-1"]
    code, _, err = cli("devices", "add", "m-1", *meter, "--tariff", "nope")
    assert code == 2 and "tariff: 'nope' is not in the billing configuration" in err
    assert "household-tou" in err or "business-flat" in err  # the known ones are named
    assert cli("devices", "add", "m-1", *meter, "--tariff", "business-flat")[0] == 0


def test_a_profile_goes_with_a_native_id(cli):
    code, _, err = cli("devices", "add", "sl-1", *LIGHT, "--native-id", "lamp-1")
    assert code == 2 and "device_profile and native_id go together" in err


def test_an_import_with_one_bad_entry_is_refused_whole_naming_it(cli, tmp_path):
    good = [FleetDevice(f"sl-{i}", "streetlight", "norrebro", 55.7, 12.5 + i / 1000, rated_w=50)
            for i in range(3)]
    doc = Fleet(good).geojson()
    doc["features"].append({"type": "Feature", "geometry": {"type": "Point",
                                                           "coordinates": [12.5, 55.7]},
                            "properties": {"device_id": "m-9", "kind": "meter",
                                           "district": "norrebro", "account_id": "acc-9",
                                           "tariff": "nope"}})
    path = tmp_path / "fleet.geojson"
    path.write_text(json.dumps(doc))
    code, _, err = cli("devices", "import", str(path))
    assert code == 2 and "nothing imported" in err
    assert "entry 4 (m-9): tariff: 'nope'" in err
    assert cli("devices", "list")[1] == ""
    doc["features"][-1]["properties"]["tariff"] = "business-flat"
    path.write_text(json.dumps(doc))
    assert cli("devices", "import", str(path))[0] == 0
    assert cli("devices", "import", str(path))[0] == 0  # idempotent
    code, out, _ = cli("devices", "export")
    assert code == 0 and sorted(d.device_id for d in Fleet.parse(json.loads(out))) == \
        ["m-9", "sl-0", "sl-1", "sl-2"]


def test_edit_is_checked_like_add(cli):
    assert cli("devices", "add", "sl-1", *LIGHT)[0] == 0
    code, _, err = cli("devices", "edit", "sl-1", "--lat", "nan")
    assert code == 2 and "lat: must be a finite number" in err
    code, out, _ = cli("devices", "edit", "sl-1", "--district", "valby", "--rated-w", "60")
    assert code == 0 and "district" in out
    assert "valby" in cli("devices", "list")[1]


def test_the_registry_counts_its_writes(tmp_path):
    registry = Registry(tmp_path, Catalogue(tariffs={"flat"}))
    other = Registry(tmp_path)  # another process's view
    v0 = other.version()
    registry.upsert(FleetDevice("sl-1", "streetlight", "d", 55.7, 12.5, rated_w=50))
    assert other.version() > v0
    v1 = other.version()
    with pytest.raises(InvalidEntry):
        registry.upsert(FleetDevice("sl-2", "streetlight", "d", math.nan, 12.5, rated_w=50))
    assert other.version() == v1  # a refused change is no change
    registry.set_status("sl-1", "revoked")
    assert other.version() > v1 and len(other.fleet()) == 0


def test_check_device_lists_every_problem():
    problems = check_device(FleetDevice("sl 1", "streetlight", "d", 91.0, 181.0, rated_w=-1))
    assert len(problems) == 4, problems
