"""InfluxDB through its v1 HTTP API: ``POST /write`` with line protocol, ``/query`` with InfluxQL.

1.x serves it natively; 2.x and 3.x through their v1-compatibility endpoints
(a token goes in the ``Authorization: Token`` header).

Errors: no answer, 5xx, 429 → StoreUnavailable; 401/403 → StoreAuthError; "database not
found" → DatabaseNotFound (both kinds of StoreUnavailable); 400 → StoreRejected.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from citygrid.store import lineproto
from citygrid.store.base import (
    Bucket,
    DatabaseNotFound,
    Point,
    StoreAuthError,
    StoreRejected,
    StoreUnavailable,
    check_aggregate,
    latest_key,
)
from citygrid.store.lifecycle import (
    HOUR_MS,
    MEASUREMENTS,
    ROLLUP_RP,
    Lifecycle,
    rollup_queries,
    rollup_select,
    with_range,
)

log = logging.getLogger("citygrid.store")


def quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InfluxStore:
    """``transport``: an httpx transport to talk through instead of the network
    (``httpx.MockTransport`` in tests); None, the default, is a real connection."""

    def __init__(self, url: str, database: str = "citygrid", *, token: str | None = None,
                 username: str | None = None, password: str | None = None,
                 timeout_s: float = 10.0, gzip_level: int = 1,
                 lifecycle: Lifecycle | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.lifecycle = lifecycle
        self.url = url.rstrip("/")
        self.database = database
        headers = {"Authorization": f"Token {token}"} if token else {}
        self._auth = {"u": username, "p": password} if username else {}
        self._gzip_level = gzip_level
        self._lifecycle_skipped = False  # warned that we may not manage it
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                                  transport=transport)

    def __repr__(self) -> str:
        return f"InfluxStore({self.url!r}, {self.database!r})"

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:  # connect refused, timeout, reset
            raise StoreUnavailable(f"InfluxDB at {self.url} unreachable: {e!r}") from e
        status = response.status_code
        if status in (401, 403):
            # 401: credentials missing or wrong; 403: valid, but not allowed (1.x: no WRITE
            # on the database, or an admin-only statement).
            refused = "refused the credentials" if status == 401 else \
                "does not allow this with the credentials given"
            detail = _error_text(response)
            raise StoreAuthError(f"InfluxDB at {self.url} {refused} ({status}: {detail})",
                                 status, detail)
        if status == 404 and _database_not_found(_error_text(response)):
            raise DatabaseNotFound(f"InfluxDB at {self.url} has no database "
                                   f"{self.database!r} ({status}: {_error_text(response)})")
        if status >= 500 or status in (404, 429):
            # Any other 404 is a path or proxy problem, not the points' fault.
            raise StoreUnavailable(f"InfluxDB answered {status}: {_error_text(response)}")
        return response

    def query(self, q: str) -> list[dict[str, Any]]:
        """Run InfluxQL; return the series of the first statement (``[]`` if none)."""
        # Credentials in the URL, as for /write: 1.x reads u and p from there (or a Basic
        # header), never from the form body.
        response = self._request("POST", "/query", params=self._auth,
                                 data={"q": q, "db": self.database, "epoch": "ms"})
        body = response.json()
        if response.status_code >= 400 or "error" in body:
            raise StoreRejected(f"InfluxQL {q!r}: {body.get('error', response.text)}")
        result = body.get("results", [{}])[0]
        if result.get("error", "").startswith("database not found"):
            if q.startswith("SELECT"):
                return []  # nothing written yet: the first write creates it
            raise DatabaseNotFound(f"InfluxDB at {self.url}: {result['error']} ({q!r})")
        if "error" in result:
            raise StoreRejected(f"InfluxQL {q!r}: {result['error']}")
        return result.get("series", [])

    def ensure_ready(self) -> None:
        """Create the database (and the lifecycle), or, for a user who may not (1.x: not
        an admin), check that it exists and takes writes."""
        try:
            self.query(f"CREATE DATABASE {quote_ident(self.database)}")
        except StoreAuthError as e:
            if e.status != 403:
                raise  # 401: the credentials themselves are wrong
            self._check_writable(f"these credentials may not create it ({e.detail})")
            if self.lifecycle is not None and not self._lifecycle_skipped:
                self._lifecycle_skipped = True
                log.warning("InfluxDB at %s: not allowed to create databases, so retention "
                            "policies and continuous queries are left as they are", self.url)
            return
        except StoreRejected as e:  # a server that does not create databases in InfluxQL
            self._check_writable(f"it could not be created ({e})")
            return
        if self.lifecycle is not None:
            self.ensure_lifecycle()

    def _check_writable(self, why_not_created: str) -> None:
        """An empty write: 204 if the database exists and we may write to it."""
        try:
            self._post_write(b"", gzipped=False)
        except DatabaseNotFound as e:
            raise DatabaseNotFound(f"{e}, and {why_not_created}") from None

    def ensure_lifecycle(self) -> list[str]:
        """Retention policies and continuous queries as the settings say; only what differs
        is changed, so this can run at every start. Returns what it did."""
        lc = self.lifecycle or Lifecycle()
        db = quote_ident(self.database)
        done: list[str] = []
        rps = {row[0]: row[1] for s in self.query(f"SHOW RETENTION POLICIES ON {db}")
               for row in s.get("values", [])}
        for name, hours, default in (("autogen", lc.raw_hours, True),
                                     (ROLLUP_RP, lc.rollup_hours, False)):
            # InfluxDB's advice: shards of 1 h under 2 days, 1 day up to 6 months, else 7 days.
            shard = "1h" if hours < 48 else "24h" if hours <= 4392 else "168h"
            clause = (f"DURATION {hours}h REPLICATION 1 SHARD DURATION {shard}"
                      + (" DEFAULT" if default else ""))
            if name not in rps:
                self.query(f"CREATE RETENTION POLICY {quote_ident(name)} ON {db} {clause}")
                done.append(f"created retention policy {name} ({hours}h)")
            elif rps[name] != f"{hours}h0m0s":
                self.query(f"ALTER RETENTION POLICY {quote_ident(name)} ON {db} {clause}")
                done.append(f"set retention policy {name} to {hours}h (was {rps[name]})")
        have = {row[0]: row[1] for s in self.query("SHOW CONTINUOUS QUERIES")
                if s.get("name") == self.database for row in s.get("values", [])}
        for name, (select, resample) in rollup_queries(self.database).items():
            want = (f"CREATE CONTINUOUS QUERY {quote_ident(name)} ON {db} {resample} "
                    f"BEGIN {select} END")
            if name in have and _normal(have[name]) == _normal(want):
                continue
            if name in have:
                self.query(f"DROP CONTINUOUS QUERY {quote_ident(name)} ON {db}")
            self.query(want)
            done.append(f"{'replaced' if name in have else 'created'} continuous query {name}")
        return done

    def maintain(self, now_ms: int | None = None) -> dict[str, int]:
        """Nothing to do by hand: InfluxDB's continuous queries and retention do it."""
        return {}

    def rollup(self, start_ms: int, end_ms: int) -> None:
        """Roll up a past range now, with the continuous queries' own statements."""
        for select, resample in rollup_queries(self.database).values():
            # As the CQ does: look back over its RESAMPLE window, for the differences.
            back = int(resample.split()[-1].rstrip("h")) - 1 if resample else 0
            self.query(with_range(select, start_ms - back * HOUR_MS, end_ms))

    def drop(self) -> None:
        self.query(f"DROP DATABASE {quote_ident(self.database)}")

    def ping(self) -> bool:
        try:
            return self._http.get("/ping").status_code == 204
        except httpx.HTTPError:
            return False

    # ------------------------------------------------------------------ writing

    def write(self, points: Sequence[Point]) -> None:
        if not points:
            return
        rejected: list[tuple[str, list[Point]]] = []
        self._write(list(points), rejected)
        if rejected:
            message = rejected[0][0]
            raise StoreRejected(message, [p for _, ps in rejected for p in ps])

    def _post_write(self, body: bytes, *, gzipped: bool = True) -> httpx.Response:
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return self._request(
            "POST", "/write",
            params={"db": self.database, "precision": "ms", **self._auth},
            content=body, headers=headers,
        )

    def _write(self, points: list[Point], rejected: list[tuple[str, list[Point]]]) -> None:
        body = gzip.compress(lineproto.encode_batch(points), self._gzip_level)
        try:
            response = self._post_write(body)
        except DatabaseNotFound:
            # A fresh server (or a dropped database): create it, then write.
            self.ensure_ready()
            response = self._post_write(body)
        if response.status_code == 204:
            return
        message = _error_text(response)
        if len(points) == 1:
            rejected.append((message, points))
            return
        # A 400 names no line reliably and 1.x keeps the good ones of a partial write;
        # halving finds the bad points, and rewriting good ones is harmless (same identity).
        half = len(points) // 2
        self._write(points[:half], rejected)
        self._write(points[half:], rejected)

    # ------------------------------------------------------------------ reading

    def _where(self, start_ms: int | None = None, end_ms: int | None = None,
               **tags: str | None) -> str:
        parts = [f"{quote_ident(k)} = {quote_literal(v)}" for k, v in tags.items() if v]
        if start_ms is not None:
            parts.append(f"time >= {int(start_ms)}ms")
        if end_ms is not None:
            parts.append(f"time < {int(end_ms)}ms")
        return (" WHERE " + " AND ".join(parts)) if parts else ""

    def latest(self, measurement: str, *, district: str | None = None,
               device_id: str | None = None) -> dict[str, Point]:
        where = self._where(district=district, device_id=device_id)
        series = self.query(f"SELECT * FROM {quote_ident(measurement)}{where} "
                            "GROUP BY * ORDER BY time DESC LIMIT 1")
        out: dict[str, Point] = {}
        for s in series:
            tags = {k: v for k, v in s.get("tags", {}).items() if v != ""}
            row = dict(zip(s["columns"], s["values"][0], strict=True))
            ts = row.pop("time")
            fields = {k: v for k, v in row.items() if v is not None and k not in tags}
            out[latest_key(tags)] = Point(measurement, tags, fields, ts)
        return out

    def aggregate(self, measurement: str, field: str, fn: str, *, start_ms: int, end_ms: int,
                  every_ms: int, district: str | None = None,
                  device_id: str | None = None) -> list[Bucket]:
        check_aggregate(fn)
        where = self._where(start_ms, end_ms, district=district, device_id=device_id)
        lc = self.lifecycle
        if lc is not None and end_ms - start_ms > lc.horizon_hours * HOUR_MS \
                and measurement in MEASUREMENTS:
            # The long view: hourly rollups (buckets of whole hours), exact for every fn.
            every = max(HOUR_MS, -(-int(every_ms) // HOUR_MS) * HOUR_MS)
            series = self.query(f"SELECT {rollup_select(field, fn)} FROM "
                                f"{quote_ident(ROLLUP_RP)}.{quote_ident(measurement)}{where} "
                                f"GROUP BY time({every}ms) fill(none)")
            return [Bucket(t, v) for s in series for t, v in s["values"]]
        series = self.query(f"SELECT {fn}({quote_ident(field)}) FROM {quote_ident(measurement)}"
                            f"{where} GROUP BY time({int(every_ms)}ms) fill(none)")
        return [Bucket(t, v) for s in series for t, v in s["values"]]

    def count(self, measurement: str, *, start_ms: int | None = None, end_ms: int | None = None,
              district: str | None = None, device_id: str | None = None) -> int:
        where = self._where(start_ms, end_ms, district=district, device_id=device_id)
        series = self.query(f"SELECT count(*) FROM {quote_ident(measurement)}{where}")
        if not series:
            return 0
        return max(v for v in series[0]["values"][0][1:] if v is not None)

    def points(self, measurement: str, *, start_ms: int, end_ms: int,
               device_id: str | None = None, chunk_ms: int = 3_600_000) -> Iterator[Point]:
        tag_keys = {row[0] for s in self.query(f"SHOW TAG KEYS FROM {quote_ident(measurement)}")
                    for row in s["values"]}
        if device_id:  # one series: a day's chunk holds fewer points than an hour of all
            chunk_ms *= 24
        for lo in range(int(start_ms), int(end_ms), chunk_ms):
            hi = min(lo + chunk_ms, int(end_ms))
            for s in self.query(f"SELECT * FROM {quote_ident(measurement)}"
                                f"{self._where(lo, hi, device_id=device_id)} ORDER BY time"):
                columns = s["columns"]
                for values in s["values"]:
                    row = dict(zip(columns, values, strict=True))
                    ts = row.pop("time")
                    tags = {k: row.pop(k) for k in list(row) if k in tag_keys}
                    yield Point(measurement, {k: v for k, v in tags.items() if v},
                                {k: v for k, v in row.items() if v is not None}, ts)

    def close(self) -> None:
        self._http.close()


def _normal(statement: str) -> str:
    """A continuous query's text as InfluxDB stores it: no quotes, single spaces."""
    return " ".join(statement.replace('"', "").split())


def _error_text(response: httpx.Response) -> str:
    """The server's message: 1.x says ``{"error": …}``, 2.x ``{"code": …, "message": …}``."""
    try:
        body = response.json()
        return str(body.get("error") or body.get("message") or response.text).strip()
    except (ValueError, AttributeError):
        return response.text.strip()[:500]


def _database_not_found(message: str) -> bool:
    """1.x: ``database not found: "x"``; 2.x: ``bucket "x" not found``."""
    message = message.lower()
    return "database not found" in message or ("bucket" in message and "not found" in message)
