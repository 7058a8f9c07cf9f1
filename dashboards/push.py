"""`citygrid dashboards push`: the datasource and dashboards into an existing Grafana.

Idempotent: the datasource is found by its uid and updated, or created; the folder
likewise; dashboards are saved with overwrite, keyed by their uid.
"""

from __future__ import annotations

import json
from typing import Any

from dashboards.build import DASHBOARDS, render

FOLDER_UID = "citygrid"
DATASOURCE_UID = "citygrid-influx"


def datasource(influx_url: str, database: str, token: str | None = None) -> dict[str, Any]:
    ds: dict[str, Any] = {"name": "CityGrid InfluxDB", "uid": DATASOURCE_UID, "type": "influxdb",
                          "access": "proxy", "url": influx_url, "isDefault": True,
                          "jsonData": {"dbName": database, "httpMode": "POST",
                                       "timeInterval": "10s"}}
    if token:  # InfluxDB 2.x / 3 Core through their v1 API
        ds["jsonData"]["httpHeaderName1"] = "Authorization"
        ds["secureJsonData"] = {"httpHeaderValue1": f"Token {token}"}
    return ds


def push(url: str, token: str, influx_url: str, database: str,
         influx_token: str | None = None) -> list[str]:
    """Grafana's HTTP API directly (httpx): grafana-client would bring urllib3-future, which
    replaces urllib3 under `requests` and breaks libraries that use it (schemathesis)."""
    import httpx

    done = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as grafana:
        ds = datasource(influx_url, database, influx_token)
        if grafana.get(f"/api/datasources/uid/{DATASOURCE_UID}").status_code == 200:
            grafana.put(f"/api/datasources/uid/{DATASOURCE_UID}", json=ds).raise_for_status()
            done.append("datasource updated")
        else:
            grafana.post("/api/datasources", json=ds).raise_for_status()
            done.append("datasource created")
        if grafana.get(f"/api/folders/{FOLDER_UID}").status_code != 200:
            grafana.post("/api/folders", json={"uid": FOLDER_UID, "title": "CityGrid"}
                         ).raise_for_status()
        for name in DASHBOARDS:
            doc = json.loads(render(name))
            doc.pop("id", None)
            grafana.post("/api/dashboards/db", json={
                "dashboard": doc, "folderUid": FOLDER_UID, "overwrite": True,
                "message": "citygrid dashboards push"}).raise_for_status()
            done.append(f"dashboard {doc['uid']}")
    return done
