"""Generate the Sparkplug B test payloads (*.bin) with the protobuf classes the adapter uses.

Message shapes follow the Eclipse Sparkplug 3.0.0 specification (§6.4: NBIRTH with bdSeq,
DBIRTH with every metric's name, alias, datatype and value, DDATA by alias only, NDEATH with
the same bdSeq, DDEATH). Metric names/values are ours (a meter device). Run from the repo root:

    PYTHONPATH=. .venv/bin/python tests/data/vendors/sparkplug/generate.py
"""

from pathlib import Path

from adapters.sparkplug import BOOLEAN, DOUBLE, INT64, UINT64, encode_payload

HERE = Path(__file__).parent
T = 1_767_225_600_000  # 2026-01-01T00:00:00Z

PAYLOADS = {
    "nbirth.bin": encode_payload([
        {"name": "bdSeq", "value": 3, "datatype": UINT64},
        {"name": "Node Control/Rebirth", "alias": 1, "value": False, "datatype": BOOLEAN},
    ], T, 0),
    "dbirth.bin": encode_payload([
        {"name": "Energy", "alias": 10, "value": 1520.25, "datatype": DOUBLE},
        {"name": "Power", "alias": 11, "value": 730.0, "datatype": DOUBLE},
        {"name": "Voltage", "alias": 12, "value": 231.4, "datatype": DOUBLE},
    ], T + 1000, 1),
    "ddata-power.bin": encode_payload([  # report by exception: only Power changed
        {"alias": 11, "value": 812.5, "datatype": DOUBLE, "timestamp": T + 60_000},
    ], T + 60_000, 2),
    "ddata-unborn.bin": encode_payload([
        {"alias": 99, "value": 1, "datatype": INT64},
    ], T + 61_000, 3),
    "ddeath.bin": encode_payload([], T + 120_000, 4),
    "ndeath.bin": encode_payload([{"name": "bdSeq", "value": 3, "datatype": UINT64}], T, 0),
    "ndeath-stale.bin": encode_payload([{"name": "bdSeq", "value": 2, "datatype": UINT64}], T,
                                       0),
}

if __name__ == "__main__":
    for name, data in PAYLOADS.items():
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")
