"""Alerts to Prometheus Alertmanager (API v2), when ``CITYGRID_ALERTMANAGER_URL`` is set.

Alertmanager expects its clients to behave like Prometheus: every active alert is posted
again at an interval with an ``endsAt`` a few intervals ahead (so an alert whose sender died
resolves by itself), and a cleared one is posted once with its ``endsAt`` now. Grouping,
silences, inhibition and routing to receivers are Alertmanager's.

One thread posts, never the engine's: a change wakes it (an alert is posted within
moments), and every ``resend_s`` it posts all that is active. While Alertmanager cannot be
reached nothing is lost: the active alerts are posted again on the next try and a cleared
one is kept until Alertmanager took it. Alerts are logged and listed as before either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from rules.alerts import AlertState

log = logging.getLogger("citygrid.rules.alertmanager")

RESEND_S = 30.0  # like Prometheus's resend delay for its rules: well inside any group_interval
ENDS_AFTER = 4  # an active alert's endsAt: this many resend intervals ahead


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class AlertmanagerNotifier:
    """Posts the rule engine's alerts to ``{url}/api/v2/alerts``.

    ``labels(alert)`` gives the labels beyond ``alertname`` and ``severity`` (``district``,
    ``device_id``, ``cabinet``, ``account``: whatever the alert's scope is), and ``link(alert)``
    the status page's address for it ("" for none)."""

    def __init__(self, url: str, labels: Callable[[AlertState], dict[str, str]],
                 link: Callable[[AlertState], str] = lambda a: "", *,
                 resend_s: float = RESEND_S, timeout_s: float = 5.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/") + "/api/v2/alerts"
        self.labels, self.link, self.resend_s = labels, link, resend_s
        self._http = httpx.Client(timeout=timeout_s, transport=transport)
        self._active: dict[str, dict[str, Any]] = {}
        self._resolved: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.posted = 0  # POSTs Alertmanager accepted
        self.failures = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="rules-alertmanager",
                                        daemon=True)
        self._thread.start()

    def _payload(self, alert: AlertState) -> dict[str, Any]:
        now = time.time() * 1000
        labels = {"alertname": alert.rule_id, "severity": alert.severity,
                  **{k: v for k, v in self.labels(alert).items() if v}}
        link = self.link(alert)
        body: dict[str, Any] = {
            "labels": labels,
            "annotations": {"summary": alert.message, "key": alert.key,
                            **({"status_page": link} if link else {})},
            # Event time, but never ahead of the wall clock (Alertmanager refuses an alert
            # that ends before it starts).
            "startsAt": _iso(min(alert.since_ms, now))}
        if link:
            body["generatorURL"] = link
        return body

    def update(self, alert: AlertState, raised: bool) -> None:
        """An alert raised (or still active, after a restart) or cleared."""
        payload = self._payload(alert)
        with self._lock:
            if raised:
                self._active[alert.key] = payload
                self._resolved.pop(alert.key, None)
            else:
                self._active.pop(alert.key, None)
                payload["endsAt"] = _iso(time.time() * 1000)
                self._resolved[alert.key] = payload
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.resend_s)
            self._wake.clear()
            if not self._stop.is_set():
                self._post()

    def _post(self) -> bool:
        ends = _iso(time.time() * 1000 + ENDS_AFTER * self.resend_s * 1000)
        with self._lock:
            active = [{**p, "endsAt": ends} for p in self._active.values()]
            resolved = dict(self._resolved)
        if not active and not resolved:
            return True
        try:
            r = self._http.post(self.url, json=active + list(resolved.values()))
            if r.status_code >= 300:
                raise httpx.HTTPError(f"HTTP {r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as e:
            if self.last_error is None:
                log.warning("Alertmanager at %s: %s (alerts are kept and posted again)",
                            self.url, e)
            self.failures += 1
            self.last_error = str(e)
            return False
        if self.last_error is not None:
            log.info("Alertmanager at %s reachable again", self.url)
        self.last_error = None
        self.posted += 1
        with self._lock:
            for key, payload in resolved.items():
                if self._resolved.get(key) is payload:
                    del self._resolved[key]
        return True

    def close(self) -> None:
        """Stop, posting what is pending once more (the cleared alerts above all)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self._post()
        self._http.close()
