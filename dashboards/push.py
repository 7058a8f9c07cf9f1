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
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    grafana = GrafanaApi.from_url(url, credential=token)
    done = []
    ds = datasource(influx_url, database, influx_token)
    try:
        grafana.datasource.get_datasource_by_uid(DATASOURCE_UID)
        grafana.datasource.update_datasource_by_uid(DATASOURCE_UID, ds)
        done.append("datasource updated")
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
        grafana.datasource.create_datasource(ds)
        done.append("datasource created")
    try:
        grafana.folder.get_folder(FOLDER_UID)
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
        grafana.folder.create_folder("CityGrid", uid=FOLDER_UID)
    for name in DASHBOARDS:
        doc = json.loads(render(name))
        doc.pop("id", None)
        grafana.dashboard.update_dashboard({"dashboard": doc, "folderUid": FOLDER_UID,
                                            "overwrite": True,
                                            "message": "citygrid dashboards push"})
        done.append(f"dashboard {doc['uid']}")
    return done
