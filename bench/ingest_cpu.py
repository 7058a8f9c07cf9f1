"""Ingest's CPU per reading in one process, no broker, no InfluxDB: decode and validate each
message (``_on_message``) and write each 5,000-reading batch (``_write_batch``: line protocol,
gzip, the HTTP request to a mock transport that answers 204). Run it from each of two
checkouts, alternating, to compare them:

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/ingest_cpu.py /tmp/before 100000
    .venv/bin/python bench/ingest_cpu.py . 100000
"""

import gc
import sys
import tempfile
import time
from pathlib import Path

if len(sys.argv) != 3:
    sys.exit(__doc__)
tree, n = str(Path(sys.argv[1]).resolve()), int(sys.argv[2])
sys.path.insert(0, tree)
import httpx  # noqa: E402
import orjson  # noqa: E402

import ingest.service as svc  # noqa: E402
from citygrid.settings import Settings  # noqa: E402
from citygrid.store.influx import InfluxStore  # noqa: E402
from ingest.service import IngestConfig, IngestService  # noqa: E402

assert svc.__file__.startswith(tree), svc.__file__

class Msg:
    __slots__ = ("topic", "payload", "mid", "qos", "epoch")
    def __init__(self, topic, payload, mid):
        self.topic, self.payload, self.mid, self.qos, self.epoch = topic, payload, mid, 1, 1

now = int(time.time() * 1000)
msgs = []
for i in range(n):
    d = i % 10_000
    msgs.append(Msg(f"city/v1/d{d % 12}/streetlight/sl-{d:05d}/telemetry",
                    orjson.dumps({"ts": now - 100_000 + i, "seq": i // 10_000,
                                  "brightness_pct": 40.0, "power_w": 24.5,
                                  "energy_wh": 1520.5 + i, "lux": 3.2, "motion": i % 7 == 0}),
                    i % 65535 + 1))
store = InfluxStore("http://x:8086", "b")
store._http = httpx.Client(base_url="http://x:8086",  # either tree: no transport= needed
                           transport=httpx.MockTransport(lambda r: httpx.Response(204)))
service = IngestService(Settings(data_dir=tempfile.mkdtemp()), store,
                        IngestConfig(receive_maximum=10**9, batch_size=5000))
gc.freeze()
gc.set_threshold(50_000, 20, 20)  # as `citygrid ingest` does
t0 = time.process_time()
for k in range(0, n, 5000):
    if hasattr(service, "_on_messages"):  # a read's worth at a time (~1,000 messages)
        for j in range(k, k + 5000, 1000):
            service._on_messages(msgs[j:j + 1000])
    else:
        for m in msgs[k:k + 5000]:
            service._on_message(None, None, m)
    batch = service._batch
    service._batch = svc._Batch()
    assert service._write_batch(batch)
took = time.process_time() - t0
assert service.metrics.readings == n, service.metrics.readings
print(f"{tree}: {took / n * 1e6:.2f} µs of CPU per reading")
