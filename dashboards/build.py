"""CityGrid's Grafana dashboards, built from code with grafana-foundation-sdk.

`citygrid dashboards build` writes them to dashboards/json/; a test fails when the
committed JSON is stale, and another runs every panel's InfluxQL against a real
InfluxDB filled by a simulated night.

The SDK has no InfluxDB query builder, so `InfluxQL` below is one: a raw InfluxQL
target, the form Grafana's InfluxDB datasource (InfluxQL mode) stores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    common,
    dashboard,
    geomap,
    piechart,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import FrameGeometrySourceMode
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    FieldColorModeId,
    VariableRefresh,
)
from grafana_foundation_sdk.models.geomap import TooltipMode

HERE = Path(__file__).parent
OUT = HERE / "json"
DATASOURCE = DataSourceRef(type_val="influxdb", uid="citygrid-influx")
DISTRICT = "district =~ /^$district$/"
DEVICE_WHERE = f"{DISTRICT} AND device_id =~ /^$device$/ AND $timeFilter"


class InfluxQLQuery(cogvariants.Dataquery):
    def __init__(self, ref_id: str, query: str, alias: str | None = None,
                 result_format: str = "time_series"):
        self.ref_id, self.query, self.alias, self.result_format = (ref_id, query, alias,
                                                                   result_format)

    def to_json(self) -> dict[str, Any]:
        out = {"refId": self.ref_id, "datasource": {"type": "influxdb", "uid": "citygrid-influx"},
               "query": self.query, "rawQuery": True, "resultFormat": self.result_format}
        if self.alias:
            out["alias"] = self.alias
        return out


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    def __init__(self, query: str, ref_id: str = "A", alias: str | None = None,
                 result_format: str = "time_series"):
        self._internal = InfluxQLQuery(ref_id, query, alias, result_format)

    def build(self) -> InfluxQLQuery:
        return self._internal


def _variables(d: dashboard.Dashboard, device_kind: str | None = None) -> dashboard.Dashboard:
    d = d.with_variable(
        dashboard.QueryVariable("district").label("District").datasource(DATASOURCE)
        .query('SHOW TAG VALUES FROM "streetlight" WITH KEY = "district"')
        .multi(True).include_all(True).all_value(".*")
        .refresh(VariableRefresh.ON_DASHBOARD_LOAD))
    if device_kind:
        d = d.with_variable(
            dashboard.QueryVariable("device").label("Device").datasource(DATASOURCE)
            .query(f'SHOW TAG VALUES FROM "{device_kind}" WITH KEY = "device_id" '
                   f"WHERE {DISTRICT}")
            .multi(True).include_all(True).all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
    return d


def _ts(title: str, *queries: tuple[str, str], unit: str = "short",
        width: int = 12, height: int = 8) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).datasource(DATASOURCE).unit(unit).height(height)
         .span(width))
    for i, (query, alias) in enumerate(queries):
        p = p.with_target(InfluxQL(query, chr(ord("A") + i), alias))
    return p


def _stat(title: str, query: str, unit: str = "short", width: int = 4) -> stat.Panel:
    return (stat.Panel().title(title).datasource(DATASOURCE).unit(unit).height(4).span(width)
            .with_target(InfluxQL(query)))


def _dashboard(title: str, uid: str, refresh: str, since: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(f"CityGrid — {title}").uid(uid).tags(["citygrid"])
            .refresh(refresh).time(since, "now"))


def city_overview() -> dashboard.Dashboard:
    d = _dashboard("city overview", "citygrid-overview", "30s", "now-24h")
    d = _variables(d)
    # Each rule worker reports its own share (tag worker; none with one worker): the city's
    # figure is the sum of every worker's latest.
    lights = 'FROM "citygrid_rules" WHERE "rule" = \'\' AND $timeFilter GROUP BY "worker"'
    for title, field in (("Lights on (100 %)", "lights_on"), ("Lights dimmed", "lights_dimmed"),
                         ("Lights off", "lights_off"), ("Active alerts", "alerts_active")):
        d = d.with_panel(_stat(title, f'SELECT sum("v") FROM (SELECT last("{field}") AS "v" '
                                      f'{lights})'))
    d = d.with_panel(_stat(
        "Lighting energy (kWh)",
        f'SELECT sum("energy_wh") / 1000 FROM "citygrid_lighting" WHERE {DISTRICT} AND '
        "$timeFilter", "kwatth"))
    d = d.with_panel(_stat(
        "Saved against 100 % all night",
        f'SELECT (sum("baseline_wh") - sum("energy_wh")) / sum("baseline_wh") * 100 FROM '
        f'"citygrid_lighting" WHERE {DISTRICT} AND $timeFilter', "percent"))
    d = d.with_panel(_stat(
        "CO₂ avoided (kg)",
        f'SELECT sum("co2_avoided_g") / 1000 FROM "citygrid_lighting" WHERE {DISTRICT} AND '
        "$timeFilter", "masskg"))
    d = d.with_panel(_ts(
        "Lighting energy against the all-night-full baseline",
        (f'SELECT sum("energy_wh") FROM "citygrid_lighting" WHERE {DISTRICT} AND $timeFilter '
         "GROUP BY time($__interval) fill(none)", "used (Wh)"),
        (f'SELECT sum("baseline_wh") FROM "citygrid_lighting" WHERE {DISTRICT} AND '
         "$timeFilter GROUP BY time($__interval) fill(none)", "100 % all night (Wh)"),
        unit="watth"))
    # The long view reads the hourly rollups (docs: data lifecycle): a year of lighting
    # energy costs 8,760 points per district, not 500,000 raw minutes.
    d = d.with_panel(_ts(
        "Lighting energy per day, last 12 months (hourly rollups)",
        (f'SELECT sum("energy_wh") / 1000 FROM "rollup_1h"."citygrid_lighting" WHERE {DISTRICT} '
         "AND $timeFilter GROUP BY time(1d) fill(none)", "used (kWh)"),
        (f'SELECT sum("baseline_wh") / 1000 FROM "rollup_1h"."citygrid_lighting" WHERE '
         f"{DISTRICT} AND $timeFilter GROUP BY time(1d) fill(none)", "100 % all night (kWh)"),
        unit="kwatth").time_from("365d"))
    d = d.with_panel(_ts(
        "Readings per second and dead letters",
        ('SELECT mean("readings_per_s") FROM "citygrid_ingest" WHERE $timeFilter '
         "GROUP BY time($__interval) fill(none)", "readings/s"),
        ('SELECT max("dead_letters_total") FROM "citygrid_ingest" WHERE $timeFilter '
         "GROUP BY time($__interval) fill(none)", "dead letters (total)")))
    return d


def streetlights() -> dashboard.Dashboard:
    d = _dashboard("streetlights", "citygrid-streetlights", "30s", "now-24h")
    d = _variables(d, "streetlight")
    where = DEVICE_WHERE
    # Positions come from the fleet (the rule engine writes them as citygrid_devices when it
    # starts), levels from the readings; Grafana joins the two tables by device_id.
    d = d.with_panel(
        geomap.Panel().title("Lights by level").datasource(DATASOURCE).height(12).span(24)
        .with_target(InfluxQL(
            'SELECT last("lat") AS "lat", last("lon") AS "lon" FROM "citygrid_devices" '
            f'WHERE "kind" = \'streetlight\' AND {DISTRICT} GROUP BY "device_id"',
            "A", result_format="table"))
        .with_target(InfluxQL(
            f'SELECT last("brightness_pct") AS "level" FROM "streetlight" WHERE {where} '
            'GROUP BY "device_id"', "B", result_format="table"))
        .with_transformation(DataTransformerConfig(
            id_val="joinByField", options={"byField": "device_id", "mode": "inner"}))
        # Markers at each light's position, coloured by its level: dark blue → bright.
        .layers([common.MapLayerOptions().type("markers").name("Lights by level")
                 .location(common.FrameGeometrySource().mode(FrameGeometrySourceMode.COORDS)
                           .latitude("lat").longitude("lon"))
                 .config({"showLegend": True, "style": {
                     "color": {"field": "level", "fixed": "dark-green"},
                     "size": {"fixed": 5},
                     "symbol": {"fixed": "img/icons/marker/circle.svg"}}})])
        .view(geomap.MapViewConfig().id("coords").lat(55.68).lon(12.56).zoom(12))
        .tooltip(geomap.TooltipOptions().mode(TooltipMode.DETAILS))
        .color_scheme(dashboard.FieldColor().mode(FieldColorModeId.CONTINUOUS_BL_YL_RD))
        .min(0).max(100).unit("percent"))
    for title, field, unit in (("Brightness by district", "brightness_pct", "percent"),
                               ("Ambient light by district", "lux", "lux")):
        d = d.with_panel(_ts(title, (
            f'SELECT mean("{field}") FROM "streetlight" WHERE {where} '
            'GROUP BY time($__interval), "district" fill(none)', "$tag_district"), unit=unit))
    d = d.with_panel(_ts("Motion by district (share of readings)", (
        f'SELECT mean("motion_count") FROM "streetlight" WHERE {where} '
        'GROUP BY time($__interval), "district" fill(none)', "$tag_district")))
    d = d.with_panel(
        table.Panel().title("Lamp faults").datasource(DATASOURCE).height(8).span(12)
        .with_target(InfluxQL(
            f'SELECT last("power_w") AS "power_w", last("brightness_pct") AS "level" FROM '
            f'"streetlight" WHERE {where} AND "fault" = \'lamp_failure\' GROUP BY "device_id"',
            result_format="table")))
    return d


def energy_and_billing() -> dashboard.Dashboard:
    d = _dashboard("energy and billing", "citygrid-billing", "1m", "now-7d")
    d = _variables(d, "meter")
    where = DEVICE_WHERE
    d = d.with_panel(_ts("Consumption by district (W)", (
        f'SELECT sum("power_w") FROM (SELECT mean("power_w") AS "power_w" FROM "meter" WHERE '
        f'{where} GROUP BY time($__interval), "device_id", "district") '
        'GROUP BY time($__interval), "district" fill(none)', "$tag_district"), unit="watt"))
    d = d.with_panel(_ts("Consumption by meter (W)", (
        f'SELECT mean("power_w") FROM "meter" WHERE {where} '
        'GROUP BY time($__interval), "device_id" fill(none)', "$tag_device_id"), unit="watt"))
    d = d.with_panel(_ts("Consumption per day by district, last 12 months (hourly rollups)", (
        f'SELECT sum("energy_kwh_delta") FROM "rollup_1h"."meter_district" WHERE {DISTRICT} '
        'AND $timeFilter GROUP BY time(1d), "district" fill(none)', "$tag_district"),
        unit="kwatth").time_from("365d"))
    d = d.with_panel(_ts("Settled (DKK) by district", (
        f'SELECT sum("amount_minor") / 100 FROM "citygrid_billing" WHERE {DISTRICT} AND '
        '$timeFilter GROUP BY time($__interval), "district" fill(none)', "$tag_district")))
    d = d.with_panel(
        table.Panel().title("Account balances (DKK)").datasource(DATASOURCE).height(8)
        .span(12).with_target(InfluxQL(
            f'SELECT last("balance_minor") / 100 AS "balance", sum("kwh") AS "kwh settled" '
            f'FROM "citygrid_billing" WHERE {DISTRICT} AND $timeFilter GROUP BY "account"',
            result_format="table")))
    # Every ledger entry, whoever appended it (rules/ledgerfeed.py): invoices issued, payments
    # the accounts' agents confirmed, credit notes, and what each account owes after them.
    ledger = 'FROM "citygrid_ledger" WHERE "kind" = \'{}\' AND $timeFilter'
    d = d.with_panel(_ts("Invoiced, paid and credited (DKK)", (
        f'SELECT sum("amount_minor") / 100 {ledger.format("invoice")} '
        "GROUP BY time($__interval) fill(none)", "invoiced"), (
        f'SELECT sum("amount_minor") / 100 {ledger.format("payment")} '
        "GROUP BY time($__interval) fill(none)", "paid"), (
        f'SELECT sum("amount_minor") / 100 {ledger.format("credit_note")} '
        "GROUP BY time($__interval) fill(none)", "credited")))
    d = d.with_panel(
        table.Panel().title("Balance and outstanding by account (DKK)").datasource(DATASOURCE)
        .height(8).span(12).with_target(InfluxQL(
            'SELECT last("balance_minor") / 100 AS "balance", last("outstanding_minor") / 100 '
            'AS "outstanding" FROM "citygrid_ledger" WHERE $timeFilter GROUP BY "account"',
            result_format="table")))
    d = d.with_panel(_stat("Outstanding, all accounts (DKK)", (
        'SELECT sum("outstanding") / 100 FROM (SELECT last("outstanding_minor") AS '
        '"outstanding" FROM "citygrid_ledger" WHERE $timeFilter GROUP BY "account")'),
        width=6))
    d = d.with_panel(_stat("Payments confirmed (DKK)", (
        f'SELECT sum("amount_minor") / 100 {ledger.format("payment")}'), width=6))
    # The leading rule worker's look for invoices past their due date (docs/invoices.md).
    d = d.with_panel(_stat("Accounts overdue", (
        'SELECT last("overdue_accounts") FROM "citygrid_rules" WHERE $timeFilter'), width=6))
    d = d.with_panel(_stat("Owed past due (DKK)", (
        'SELECT last("overdue_minor") / 100 FROM "citygrid_rules" WHERE $timeFilter'),
        width=6))
    d = d.with_panel(_ts("Time-of-use price bands (per kWh)", (
        'SELECT last("price") FROM "citygrid_tariff" WHERE $timeFilter '
        'GROUP BY time($__interval), "tariff" fill(previous)', "$tag_tariff")))
    return d


def platform_health() -> dashboard.Dashboard:
    d = _dashboard("platform health", "citygrid-health", "10s", "now-6h")
    ingest = 'FROM "citygrid_ingest" WHERE "reason" = \'\' AND $timeFilter'
    d = d.with_panel(_ts("Ingest rate", (
        f'SELECT mean("readings_per_s") {ingest} GROUP BY time($__interval), "worker" '
        "fill(none)", "$tag_worker readings/s")))
    d = d.with_panel(_ts("Batch latency and reading→stored lag", (
        f'SELECT max("batch_latency_max_ms") {ingest} GROUP BY time($__interval) fill(none)',
        "batch max (ms)"), (
        f'SELECT max("lag_p99_ms") {ingest} GROUP BY time($__interval) fill(none)',
        "lag p99 (ms)"), unit="ms"))
    d = d.with_panel(_ts("Buffer and spool", (
        f'SELECT max("buffered_messages") {ingest} GROUP BY time($__interval) fill(none)',
        "unacknowledged messages"), (
        f'SELECT max("spool_points") {ingest} GROUP BY time($__interval) fill(none)',
        "spooled points")))
    d = d.with_panel(_ts("Dead letters by reason", (
        'SELECT max("dead_letters_total") FROM "citygrid_ingest" WHERE "reason" != \'\' AND '
        '$timeFilter GROUP BY time($__interval), "reason" fill(none)', "$tag_reason")))
    # Per worker first (each counts its own share), then summed: the city's figure.
    def per_worker(select: str, rule: str, by: str = "") -> str:
        return (f'SELECT sum("v") FROM (SELECT {select} AS "v" FROM "citygrid_rules" WHERE '
                f'"rule" {rule} \'\' AND $timeFilter GROUP BY time($__interval), "worker"{by} '
                f"fill(none)) WHERE $timeFilter GROUP BY time($__interval){by} fill(none)")

    d = d.with_panel(_ts("Rule evaluations and errors", (
        per_worker('non_negative_difference(last("evaluations"))', "!=", ', "rule"'),
        "$tag_rule"), (
        per_worker('non_negative_difference(last("errors"))', "!=", ', "rule"'),
        "$tag_rule errors")))
    d = d.with_panel(_ts("Commands and acknowledgements", (
        per_worker('non_negative_difference(last("commands_total"))', "="), "commands"), (
        per_worker('last("acks_pending")', "="), "awaiting an ack")))
    return d


def maintenance() -> dashboard.Dashboard:
    """Work orders (the rule runner writes citygrid_maintenance per district once a minute of
    event time, and one citygrid_work_orders point per order done)."""
    d = _dashboard("maintenance", "citygrid-maintenance", "1m", "now-7d")
    d = _variables(d)
    counts = f'FROM "citygrid_maintenance" WHERE {DISTRICT} AND $timeFilter GROUP BY "district"'
    done = f'FROM "citygrid_work_orders" WHERE {DISTRICT} AND $timeFilter'
    d = d.with_panel(_stat("Open work orders", f'SELECT sum("v") FROM (SELECT last("open") '
                                               f'AS "v" {counts})'))
    d = d.with_panel(_stat("Assigned to a crew", f'SELECT sum("v") FROM (SELECT '
                                                 f'last("assigned") AS "v" {counts})'))
    d = d.with_panel(_stat("Done in the last 24 h", f'SELECT sum("v") FROM (SELECT '
                                                    f'last("done_24h") AS "v" {counts})'))
    d = d.with_panel(_stat("Median time to repair", f'SELECT median("repair_h") {done}', "h"))
    d = d.with_panel(_stat("Mean time to repair", f'SELECT mean("repair_h") {done}', "h"))
    d = d.with_panel(_stat("Orders done", f'SELECT count("repair_h") {done}'))
    d = d.with_panel(_ts("Open work orders per district", (
        f'SELECT last("open") + last("assigned") FROM "citygrid_maintenance" WHERE {DISTRICT} '
        'AND $timeFilter GROUP BY time($__interval), "district" fill(previous)',
        "$tag_district")))
    d = d.with_panel(_ts("Time to repair by district (median, h)", (
        f'SELECT median("repair_h") {done} GROUP BY time($__interval), "district" fill(none)',
        "$tag_district"), unit="h"))
    d = d.with_panel(
        piechart.Panel().title("Orders done by cause").datasource(DATASOURCE).height(8)
        .span(8).with_target(InfluxQL(f'SELECT count("repair_h") {done} GROUP BY "cause"',
                                      alias="$tag_cause")))
    d = d.with_panel(
        table.Panel().title("Time to repair by district and problem (h)").datasource(DATASOURCE)
        .height(8).span(16).with_target(InfluxQL(
            f'SELECT count("repair_h") AS "done", median("repair_h") AS "median", '
            f'mean("repair_h") AS "mean", max("repair_h") AS "longest" {done} '
            'GROUP BY "district", "problem"', result_format="table")))
    return d


DASHBOARDS = {"city-overview": city_overview, "streetlights": streetlights,
              "energy-and-billing": energy_and_billing, "platform-health": platform_health,
              "maintenance": maintenance}


def render(name: str) -> str:
    built = DASHBOARDS[name]().build()
    return json.dumps(json.loads(json.dumps(built, cls=JSONEncoder)), indent=2,
                      sort_keys=True) + "\n"


def build(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DASHBOARDS:
        path = out / f"{name}.json"
        path.write_text(render(name))
        paths.append(path)
    return paths


def panel_queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, InfluxQL) for every target of every panel."""
    return [(p["title"], t["query"]) for p in doc.get("panels", [])
            for t in p.get("targets", []) if t.get("rawQuery")]
