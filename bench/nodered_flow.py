"""The peer's flow for bench/pipeline.py: Node-RED doing what `citygrid ingest` does.

mqtt in (QoS 1, persistent session, payload parsed as JSON) → function (a point per
reading: measurement = kind, tags device_id and district, the reading's fields, its time)
→ join (1,000 points or 0.2 s, the same batch bounds as ingest) → influxdb batch (one HTTP
write per batch, as node-red-contrib-influxdb's documentation recommends for many points).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

TO_POINT = """
const parts = msg.topic.split('/');            // city/v1/{district}/{kind}/{device}/telemetry
const r = msg.payload;
if (typeof r !== 'object' || r === null || typeof r.ts !== 'number') { return null; }
const fields = {};
for (const k of Object.keys(r)) {
  const v = r[k];
  if (k !== 'ts' && v !== null && (typeof v === 'number' || typeof v === 'boolean'
                                    || typeof v === 'string')) { fields[k] = v; }
}
msg.payload = {measurement: parts[3], tags: {device_id: parts[4], district: parts[2]},
               fields: fields, timestamp: new Date(r.ts)};
return msg;
"""


def flow(mqtt_host: str, mqtt_port: int, influx_url: str, db: str, client_id: str) -> list:
    influx = urlsplit(influx_url)
    return [
        {"id": "tab", "type": "tab", "label": "citygrid-peer"},
        {"id": "broker", "type": "mqtt-broker", "name": "city", "broker": mqtt_host,
         "port": str(mqtt_port), "clientid": client_id, "autoConnect": True, "usetls": False,
         "protocolVersion": "4", "keepalive": "60", "cleansession": False,
         "autoUnsubscribe": False},
        {"id": "db", "type": "influxdb", "hostname": influx.hostname, "port": str(influx.port),
         "protocol": "http", "database": db, "name": "citygrid", "usetls": False,
         "influxdbVersion": "1.x"},
        {"id": "in", "type": "mqtt in", "z": "tab", "name": "telemetry",
         "topic": "city/v1/+/+/+/telemetry", "qos": "1", "datatype": "json",
         "broker": "broker", "nl": False, "rap": False, "inputs": 0, "x": 100, "y": 100,
         "wires": [["point"]]},
        {"id": "point", "type": "function", "z": "tab", "name": "to point", "func": TO_POINT,
         "outputs": 1, "x": 300, "y": 100, "wires": [["batch"]]},
        {"id": "batch", "type": "join", "z": "tab", "name": "1000 or 0.2 s", "mode": "custom",
         "build": "array", "property": "payload", "propertyType": "msg", "key": "topic",
         "joiner": "\\n", "joinerType": "str", "accumulate": False, "timeout": "0.2",
         "count": "1000", "reduceRight": False, "x": 500, "y": 100, "wires": [["write"]]},
        {"id": "write", "type": "influxdb batch", "z": "tab", "influxdb": "db",
         "precision": "ms", "retentionPolicy": "", "name": "write", "x": 700, "y": 100,
         "wires": []},
    ]


def write_flow(user_dir: Path, mqtt_host: str, mqtt_port: int, influx_url: str, db: str,
               port: int, client_id: str) -> None:
    user_dir.mkdir(parents=True, exist_ok=True)
    (user_dir / "flows.json").write_text(json.dumps(
        flow(mqtt_host, mqtt_port, influx_url, db, client_id), indent=1))
    (user_dir / "settings.js").write_text(
        "module.exports = {\n"
        f"  uiPort: {port}, uiHost: '127.0.0.1',\n"
        "  flowFile: 'flows.json', credentialSecret: false,\n"
        "  logging: {console: {level: 'info', metrics: false, audit: false}},\n"
        "  editorTheme: {projects: {enabled: false}},\n"
        "  telemetry: {enabled: false}, diagnostics: {enabled: false},\n"
        "};\n")
