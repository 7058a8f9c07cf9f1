"""Gateway benchmark: the device list with latest readings for 10,000 devices.

A registry of 10,000 devices (the generated Copenhagen fleet), a store holding the last
ten readings of each, the gateway served by uvicorn on this machine, and an HTTP client
asking for /api/v1/devices again and again; p50/p99 latency of the whole response.

Usage: .venv/bin/python bench/gateway.py [--devices 10000] [--requests 100] [--influx]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityctl.localservices import Influxd, free_port  # noqa: E402
from citygrid.city import COPENHAGEN  # noqa: E402
from citygrid.registry import Registry  # noqa: E402
from citygrid.settings import Settings  # noqa: E402
from citygrid.store import Point, open_store  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.tokens import create_token  # noqa: E402
from simulators.fleetgen import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--influx", action="store_true", help="InfluxDB as the store (else SQLite)")
    args = ap.parse_args()
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="citygrid-bench-") as tmp:
        influx = None
        settings = Settings(data_dir=tmp)
        if args.influx:
            influx = Influxd(Path(tmp) / "influx")
            influx.start()
            settings = settings.with_(influx_url=influx.url)
        fleet = generate(COPENHAGEN, args.devices * 3 // 4, args.devices - args.devices * 3 // 4)
        registry = Registry(tmp)
        registry.import_fleet(fleet)
        token = create_token(tmp, "viewer", "bench")
        store = open_store(settings)
        store.ensure_ready()
        t0 = 1_790_000_000_000
        points = [Point(d.kind, {"device_id": d.device_id, "district": d.district},
                        {"seq": k, "power_w": 10.0 + k, "brightness_pct": 30.0}
                        if d.kind == "streetlight" else {"seq": k, "energy_kwh": 100.0 + k,
                                                         "power_w": 500.0},
                        t0 + k * 60_000) for k in range(10) for d in fleet]
        for i in range(0, len(points), 5000):
            store.write(points[i:i + 5000])
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1",
                                               port=port, log_level="warning",
                                               access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        latencies = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}",
                          headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            first = client.get("/api/v1/devices")
            assert first.status_code == 200 and len(first.json()) == args.devices
            assert all(d["latest"] for d in first.json())
            for _ in range(args.requests):
                started = time.perf_counter()
                r = client.get("/api/v1/devices")
                latencies.append((time.perf_counter() - started) * 1000)
                assert r.status_code == 200
        server.should_exit = True
        thread.join(10)
        if influx:
            influx.stop()
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        backend = "InfluxDB" if args.influx else "SQLite"
        print(f"{args.devices:,} devices with latest readings ({backend} store, "
              f"{len(first.content) / 1e6:.1f} MB): p50 "
              f"{statistics.median(latencies):.0f} ms, p99 {p99:.0f} ms (target ≤ 200) over "
              f"{len(latencies)} requests")


if __name__ == "__main__":
    main()
