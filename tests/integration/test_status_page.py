"""The status page in real headless Chromium (Debian's package; Playwright drives it, no
browser download), against `citygrid up --no-simulator`: real broker, rules and gateway.
Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timedelta

import orjson
import pytest

from citygrid.city import city
from citygrid.fleet import Fleet
from tests.helpers import IN_CI, REPO, CityUp, Listener, Publisher, need, wait_until

pytestmark = pytest.mark.integration
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--no-first-run", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def city_up(tmp_path):
    need("mosquitto")
    up = CityUp(tmp_path / "city", "--broker", "mosquitto", "--no-simulator",
                "--streetlights", "120", "--meters", "30")
    try:
        assert up.wait_for(r"(ready|NOT READY) in", 60)[1] == "ready"
        yield up
    finally:
        up.close()


@pytest.fixture
def page(city_up):
    from playwright.sync_api import sync_playwright

    executable = chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        page.problems = []
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: page.problems.append(f"failed: {r.url}"))
        try:
            yield page
        finally:
            browser.close()


def _night_ms() -> int:
    tz = city("copenhagen").tz
    night = (datetime.now(tz) - timedelta(days=1)).replace(hour=23, minute=0, second=0,
                                                          microsecond=0)
    return int(night.timestamp() * 1000)


def test_status_page_map_live_motion_and_override(city_up, page):
    fleet = Fleet.load(city_up.data_dir / "fleet.geojson")
    lights = fleet.of_kind("streetlight")
    page.goto(f"{city_up.url}/#token={city_up.token}")

    # The map draws every light (and meter) from the registry, offline, no tiles.
    page.wait_for_function(f"document.querySelectorAll('circle.light').length === {len(lights)}",
                           timeout=15_000)
    assert page.locator("rect.meter").count() == len(fleet.of_kind("meter"))
    assert "#token" not in page.url  # the token left the address bar
    page.wait_for_selector("#live.on", timeout=10_000)

    # A motion event at night on a quiet street, sent over MQTT as the light would: the
    # light and its neighbours within 40 m turn to 100 % on the page within seconds (the
    # demo city's motion-boost, rules/examples/demo-city.yaml).
    target = next(d for d in lights if d.road in ("residential", "footpath", "park")
                  and len(fleet.neighbours(d.device_id, 40)) >= 1)
    group = [target.device_id] + [d.device_id for d in fleet.neighbours(target.device_id, 40)]
    device = Publisher(city_up.mqtt_url, "test-device")
    try:
        device.send(f"city/v1/{target.district}/streetlight/{target.device_id}/telemetry",
                    {"ts": _night_ms(), "seq": 1, "brightness_pct": 30.0, "power_w": 20.0,
                     "energy_wh": 1000.0, "lux": 1.0, "motion": True}).wait_for_publish(5)
    finally:
        device.close()
    ids = orjson.dumps(group).decode()
    page.wait_for_function(
        f"{ids}.every(id => document.getElementById('dev-' + id).dataset.level === '100')",
        timeout=5_000)
    page.screenshot(path=str(ARTIFACTS / "status-page-motion.png"))

    # Click another light: its reading and why it is at its level; override it from there.
    other = next(d for d in lights if d.device_id not in group
                 and all(n.device_id not in group for n in fleet.neighbours(d.device_id, 60)))
    listener = Listener(city_up.mqtt_url)
    try:
        wait_until(lambda: listener.client.is_connected(), 10, message="listener connected")
        page.click(f"#dev-{other.device_id}")
        page.wait_for_selector("#detail:not([hidden])")
        assert page.inner_text("#detail-title") == other.device_id
        page.wait_for_function("!document.getElementById('explain').textContent.startsWith('…')")
        assert "because" in page.inner_text("#explain")
        page.fill("#override-level", "70")
        page.fill("#override-minutes", "10")
        page.click("#override-send")
        command = wait_until(lambda: next(
            (c for c in listener.commands if c["brightness_pct"] == 70.0), None), 10,
            message=f"the override on {other.device_id}'s cmd topic")
        assert command["reason"].startswith("override")
        # The page writes its confirmation when the PUT's answer arrives, which may be a
        # moment after the command itself reached the broker.
        page.wait_for_function(
            "document.getElementById('override-result').textContent.startsWith('Sent')",
            timeout=5_000)
        page.wait_for_function(
            f"document.getElementById('dev-{other.device_id}').dataset.level === '70'",
            timeout=5_000)
        # The latest commands list shows it with its reason.
        assert other.device_id in page.inner_text("#commands")
        page.screenshot(path=str(ARTIFACTS / "status-page-override.png"))
    finally:
        listener.close()
    assert page.problems == [], page.problems


def test_status_page_lists_an_unregistered_device_and_an_admin_registers_it(city_up, page):
    from citygrid.registry import Registry
    from gateway import create_token

    admin = create_token(city_up.data_dir, "admin", "test-admin")
    device = Publisher(city_up.mqtt_url, "test-stray")
    try:
        device.send("city/v1/valby/streetlight/sl-stray/telemetry",
                    {"ts": _night_ms(), "seq": 1, "brightness_pct": 30.0, "power_w": 20.0,
                     "energy_wh": 1000.0, "lux": 1.0, "motion": False}).wait_for_publish(5)
    finally:
        device.close()
    page.goto(f"{city_up.url}/#token={admin}")
    # Ingest writes what it saw within a second; the page asks every 5 s.
    row = page.locator("#unregistered tr[data-device='sl-stray']")
    row.wait_for(timeout=15_000)
    assert row.locator("td").nth(2).inner_text() == "valby"
    assert '"seq":1' in row.get_attribute("title").replace(" ", "")  # the sample, on hover
    row.click()
    page.wait_for_selector("#register-form:not([hidden])")
    assert page.input_value("#register-district") == "valby"
    assert '"seq"' in page.inner_text("#register-sample")
    page.click("#register-pick")  # the position, from a click on the map
    page.click("#map", position={"x": 300, "y": 300})
    lat, lon = float(page.input_value("#register-lat")), float(page.input_value("#register-lon"))
    assert 55 < lat < 56 and 12 < lon < 13, (lat, lon)
    page.fill("#register-rated", "55")
    page.screenshot(path=str(ARTIFACTS / "status-page-unregistered.png"))
    page.click("#register-send")
    page.wait_for_function(
        "document.getElementById('unregistered-note').textContent.startsWith('Registered')",
        timeout=5_000)
    page.wait_for_selector("#dev-sl-stray", state="attached", timeout=5_000)  # on the map
    assert row.count() == 0
    page.screenshot(path=str(ARTIFACTS / "status-page-registered.png"))
    registry = Registry(city_up.data_dir)
    try:
        record = registry.record("sl-stray")
    finally:
        registry.close()
    assert (record["kind"], record["district"], record["rated_w"]) == ("streetlight", "valby", 55)
    assert abs(record["lat"] - lat) < 1e-5 and page.problems == [], page.problems


def test_an_alerts_link_opens_its_light(city_up, page):
    """Alertmanager's `status_page` annotation is `STATUS_URL/#device=ID`: the page opens
    with that light's details, its reading and why it is at its level."""
    fleet = Fleet.load(city_up.data_dir / "fleet.geojson")
    light = fleet.of_kind("streetlight")[3]
    page.goto(f"{city_up.url}/#token={city_up.token}&device={light.device_id}")
    page.wait_for_selector("#detail:not([hidden])", timeout=15_000)
    assert page.inner_text("#detail-title") == light.device_id
    assert page.locator(f"#dev-{light.device_id}.selected").count() == 1
    assert page.problems == [], page.problems


def test_the_energy_chart_spans_its_data_not_years(city_up, page):
    """With a single hour of lighting data (a new city) the chart's time axis is that hour,
    give or take half an hour — not May 2027 to May 2029 (uPlot pads a single point)."""
    fleet = Fleet.load(city_up.data_dir / "fleet.geojson")
    light = fleet.of_kind("streetlight")[0]
    device = Publisher(city_up.mqtt_url, "test-energy-device")
    now = int(time.time() * 1000)
    try:  # a few minutes of one light, this hour: the rule engine's first lighting minutes
        for i in range(5):
            device.send(f"city/v1/{light.district}/streetlight/{light.device_id}/telemetry",
                        {"ts": now - 300_000 + i * 70_000, "seq": i + 1, "brightness_pct": 30.0,
                         "power_w": 20.0, "energy_wh": 1000.0 + i, "lux": 1.0,
                         "motion": False}).wait_for_publish(5)
    finally:
        device.close()
    page.goto(f"{city_up.url}/#token={city_up.token}")
    page.wait_for_function("typeof state !== 'undefined' && state.charts.energy"
                           " && state.charts.energy.data[0].length > 0", timeout=60_000)
    x_min, x_max, d_min, d_max = page.evaluate(
        "() => { const u = state.charts.energy; const xs = u.data[0];"
        " return [u.scales.x.min, u.scales.x.max, Math.min(...xs), Math.max(...xs)]; }")
    assert x_min >= d_min - 1800 and x_max <= d_max + 1800, (x_min, x_max, d_min, d_max)
    assert page.problems == [], page.problems


def test_the_saving_by_district_shows_each_districts_lighting(city_up, page):
    """A night of two lights in two districts, dimmed to 30 %: the page's table gives each
    district's energy used, its all-night-full baseline and the share saved, the figures
    the summary route computes from the rule engine's lighting minutes."""
    import httpx

    fleet = Fleet.load(city_up.data_dir / "fleet.geojson")
    lights = fleet.of_kind("streetlight")
    first = lights[0]
    second = next(d for d in lights if d.district != first.district)
    device = Publisher(city_up.mqtt_url, "test-saving-devices")
    night = _night_ms()
    try:
        for i in range(6):
            for light in (first, second):
                power = light.rated_w * 0.3 * 1.08 + 0.5
                device.send(f"city/v1/{light.district}/streetlight/{light.device_id}/telemetry",
                            {"ts": night + i * 70_000, "seq": i + 1, "brightness_pct": 30.0,
                             "power_w": power, "energy_wh": 1000.0 + i, "lux": 1.0,
                             "motion": False}).wait_for_publish(5)
    finally:
        device.close()

    def districts():
        s = httpx.get(f"{city_up.url}/api/v1/status",
                      headers={"Authorization": f"Bearer {city_up.token}"}).json()
        rows = {x["district"]: x for x in s["lighting_districts"]}
        wanted = [rows.get(d.district) for d in (first, second)]
        return rows if all(r and r["saved_pct"] is not None for r in wanted) else None

    rows = wait_until(districts, 90, message="both districts' lighting minutes")
    for light in (first, second):
        row = rows[light.district]
        # 30 % of the rated power against the rated power with its losses, all night.
        full = light.rated_w * 1.08 + 0.5
        expected = (1 - (light.rated_w * 0.3 * 1.08 + 0.5) / full) * 100
        assert row["saved_pct"] == pytest.approx(expected, abs=0.15), row
    page.goto(f"{city_up.url}/#token={city_up.token}")
    page.wait_for_function("document.querySelectorAll('#lighting-districts tr').length >= 2",
                           timeout=30_000)
    table = {r[0]: r for r in page.eval_on_selector_all(
        "#lighting-districts tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")}
    for light in (first, second):
        row = rows[light.district]
        assert table[light.district][3] == f"{row['saved_pct']} %", table
        assert table[light.district][1] == f"{row['used_kwh']:.1f} kWh", table
    assert page.problems == [], page.problems


def test_a_lamp_failure_rings_its_light_on_the_map_and_its_alarm_opens_it(city_up, page):
    """A light commanded on at night that draws only its standby power for minutes raises a
    lamp-failure alarm: the map rings that light in the alarm's colour, the alert list says
    so, and clicking the alarm opens the light."""
    fleet = Fleet.load(city_up.data_dir / "fleet.geojson")
    light = fleet.of_kind("streetlight")[5]
    device = Publisher(city_up.mqtt_url, "test-failing-lamp")
    night = _night_ms()
    try:
        for i in range(9):  # eight minutes at 30 %, drawing 0.5 W
            device.send(f"city/v1/{light.district}/streetlight/{light.device_id}/telemetry",
                        {"ts": night + i * 60_000, "seq": i + 1, "brightness_pct": 30.0,
                         "power_w": 0.5, "energy_wh": 1000.0, "lux": 1.0,
                         "motion": False}).wait_for_publish(5)
    finally:
        device.close()
    page.goto(f"{city_up.url}/#token={city_up.token}")
    ring = f"#dev-{light.device_id}.alarm"
    page.wait_for_selector(ring, state="attached", timeout=60_000)
    assert page.get_attribute(ring, "data-alarm") in ("major", "critical")
    assert page.locator("circle.light.alarm").count() == 1
    item = page.locator("#alerts li.link", has_text=light.device_id).first
    item.click()
    page.wait_for_selector("#detail:not([hidden])", timeout=5_000)
    assert page.inner_text("#detail-title") == light.device_id
    page.screenshot(path=str(ARTIFACTS / "status-page-alarm.png"))
    assert page.problems == [], page.problems


def test_the_work_orders_list_and_map_and_an_operator_assigns_and_closes(city_up, page):
    """Open and assigned orders, newest first, on the list and as rings on the map; an
    operator assigns one and closes another with a cause from the page; a viewer sees no
    buttons."""
    from citygrid.maintenance import WorkOrders, device_trigger
    from gateway import create_token

    lights = Fleet.load(city_up.data_dir / "fleet.geojson").of_kind("streetlight")
    orders = WorkOrders(city_up.data_dir)
    now = int(time.time() * 1000)
    try:
        a, _ = orders.open_or_join(device_trigger(lights[0], "lamp_fault", "lamp-fault@x",
                                                  "rules"), now - 3 * 3_600_000)
        b, _ = orders.open_or_join(device_trigger(lights[1], "day_burning", "day-burning@x",
                                                  "rules"), now - 600_000)
        c, _ = orders.open_or_join(device_trigger(lights[2], "lamp_fault", "x", "rules"), now)
        orders.done(c.id, "no_fault_found", "op", now)
        page.goto(f"{city_up.url}/#token={city_up.token}")  # an operator's
        page.wait_for_function(
            "document.querySelectorAll('#work-orders tr').length === 2", timeout=15_000)
        rows = page.locator("#work-orders tr")
        assert [rows.nth(i).get_attribute("data-order") for i in range(2)] == [b.id, a.id]
        assert rows.nth(0).inner_text().split("\t")[:5] == [
            b.id, "open", "day burning", lights[1].device_id, "10 min"]
        assert rows.nth(1).locator("td").nth(4).inner_text() == "3 h"
        page.wait_for_function("document.querySelectorAll('circle.order').length === 2")
        assert page.locator(f"circle.order[data-order='{a.id}']").count() == 1
        page.wait_for_selector("#orders-card.operator")
        row_a = page.locator(f"#work-orders tr[data-order='{a.id}']")
        row_a.locator("input.assignee").fill("crew-7")
        row_a.locator("button.assign").click()
        page.wait_for_function(
            "document.getElementById('orders-result').textContent.includes('assigned')",
            timeout=5_000)
        assert "assigned (crew-7)" in row_a.inner_text()
        assert page.locator(f"circle.order[data-order='{a.id}']").get_attribute(
            "data-state") == "assigned"
        row_b = page.locator(f"#work-orders tr[data-order='{b.id}']")
        row_b.locator("select.cause").select_option("cable_fault")
        row_b.locator("button.close-order").click()
        page.wait_for_function(
            "document.querySelectorAll('#work-orders tr').length === 1", timeout=5_000)
        assert page.locator("circle.order").count() == 1
        page.screenshot(path=str(ARTIFACTS / "status-page-work-orders.png"))
        assert (orders.get(a.id).assignee, orders.get(b.id).cause) == ("crew-7", "cable_fault")
        assert orders.get(b.id).history[-1].who.endswith("(operator)")
        assert page.problems == [], page.problems
        # A viewer sees the list, without the buttons.
        viewer = create_token(city_up.data_dir, "viewer", "test-viewer")
        page.goto(f"{city_up.url}/?viewer#token={viewer}")
        page.wait_for_function(
            "document.querySelectorAll('#work-orders tr').length === 1", timeout=15_000)
        page.wait_for_function("typeof state !== 'undefined' && state.role === 'viewer'")
        assert not page.locator(f"#work-orders tr[data-order='{a.id}'] button.close-order"
                                ).is_visible()
    finally:
        orders.close()
    # Leaving the operator's page cut its live stream: that one is no problem.
    assert [p for p in page.problems if not p.endswith("/api/v1/stream")] == [], page.problems
