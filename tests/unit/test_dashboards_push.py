"""`citygrid dashboards push` against a stand-in Grafana (no Grafana can run here): the
requests it makes, and that pushing twice changes nothing but versions."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dashboards.build import DASHBOARDS
from dashboards.push import push


class FakeGrafana(BaseHTTPRequestHandler):
    datasources: dict[str, dict] = {}
    folders: dict[str, dict] = {}
    dashboards: dict[str, dict] = {}
    auth: set[str] = set()

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        self.auth.add(self.headers.get("Authorization", ""))
        n = int(self.headers.get("Content-Length", 0))
        return json.loads(self.rfile.read(n)) if n else {}

    def do_GET(self):
        self._body()
        if self.path.startswith("/api/datasources/uid/"):
            uid = self.path.rsplit("/", 1)[1]
            return self._reply(200, self.datasources[uid]) if uid in self.datasources else \
                self._reply(404, {"message": "not found"})
        if self.path.startswith("/api/folders/"):
            uid = self.path.rsplit("/", 1)[1]
            return self._reply(200, self.folders[uid]) if uid in self.folders else \
                self._reply(404, {"message": "not found"})
        self._reply(404, {"message": "no route"})

    def do_POST(self):
        body = self._body()
        if self.path == "/api/datasources":
            self.datasources[body["uid"]] = body
            return self._reply(200, {"message": "created"})
        if self.path == "/api/folders":
            self.folders[body["uid"]] = body
            return self._reply(200, body)
        if self.path == "/api/dashboards/db":
            uid = body["dashboard"]["uid"]
            old = self.dashboards.get(uid)
            if old and not body.get("overwrite"):
                return self._reply(412, {"message": "exists"})
            self.dashboards[uid] = {**body, "version": (old or {}).get("version", 0) + 1}
            return self._reply(200, {"uid": uid, "status": "success"})
        self._reply(404, {"message": "no route"})

    def do_PUT(self):
        body = self._body()
        if self.path.startswith("/api/datasources/uid/"):
            self.datasources[self.path.rsplit("/", 1)[1]] = body
            return self._reply(200, {"message": "updated"})
        self._reply(404, {"message": "no route"})


def test_push_is_idempotent():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGrafana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        first = push(url, "glsa_secret", "http://influx:8086", "citygrid")
        second = push(url, "glsa_secret", "http://influx:8086", "citygrid", influx_token="t0k")
    finally:
        server.shutdown()
    assert first[0] == "datasource created" and second[0] == "datasource updated"
    assert list(FakeGrafana.datasources) == ["citygrid-influx"]
    ds = FakeGrafana.datasources["citygrid-influx"]
    assert ds["jsonData"]["dbName"] == "citygrid"
    assert ds["secureJsonData"]["httpHeaderValue1"] == "Token t0k"
    assert list(FakeGrafana.folders) == ["citygrid"]
    assert len(FakeGrafana.dashboards) == len(DASHBOARDS)
    assert {d["version"] for d in FakeGrafana.dashboards.values()} == {2}
    assert all(d["folderUid"] == "citygrid" for d in FakeGrafana.dashboards.values())
    assert FakeGrafana.auth == {"Bearer glsa_secret"}
