"""``citygrid ingest`` (the MQTT → store pipeline) and ``citygrid ingest dlq``."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from citygrid.settings import UNKNOWN_DEVICES, Settings


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ingest", parents=[common], help="MQTT → store pipeline")
    p.add_argument("--group", help="shared-subscription group: workers in one group split load")
    p.add_argument("--partition", metavar="I/N",
                   help="store only partition I of N of the districts (0/3, 1/3, 2/3: three "
                        "workers), for brokers without shared subscriptions (docs/scale-out.md)")
    p.add_argument("--partition-by", choices=("district", "device"), default=None,
                   help="what --partition splits: districts (default), or devices — even "
                        "shares however few the districts are (ingest keeps nothing per "
                        "district)")
    p.add_argument("--client-id", default=None,
                   help="MQTT client id; the persistent session is keyed by it (default "
                        "citygrid-ingest, with --partition citygrid-ingest-p<I>of<N>)")
    p.add_argument("--topic", help="topic filter (default city/v1/+/+/+/telemetry)")
    p.add_argument("--batch-size", type=int, default=5000, help="lines per write (5000)")
    p.add_argument("--flush-interval", type=float, default=0.2,
                   help="seconds a partial batch may wait (0.2)")
    p.add_argument("--receive-maximum", type=int, default=10_000,
                   help="unacknowledged messages the broker may send us (10000, max 65535)")
    p.add_argument("--report-interval", type=float, default=10.0,
                   help="seconds between self-reports into citygrid_ingest (10)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--unknown-devices", choices=UNKNOWN_DEVICES,
                   help="readings from devices the registry does not know: store them (and "
                        "list the devices as unregistered) or quarantine them as dead letters "
                        "(env CITYGRID_UNKNOWN_DEVICES, default store)")
    p.set_defaults(func=cmd_ingest)
    ingest_sub = p.add_subparsers(dest="ingest_command", metavar="SUBCOMMAND")
    d = ingest_sub.add_parser("dlq", parents=[common], help="show the latest dead letters")
    d.add_argument("--limit", type=int, default=20)
    d.add_argument("--reason", help="only this reason, e.g. out_of_range")
    d.set_defaults(func=cmd_ingest_dlq)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(mqtt_url=args.mqtt_url, influx_url=args.influx_url,
                             influx_db=args.influx_db, data_dir=args.data_dir,
                             unknown_devices=getattr(args, "unknown_devices", None))


def cmd_ingest(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; exit 2 at once if the store refuses the credentials or has
    no database for us (spooling would only hide it)."""
    from citygrid.partition import Partition
    from citygrid.store import DatabaseNotFound, StoreAuthError, open_store
    from ingest.service import IngestConfig, IngestService

    settings = _settings(args)
    try:
        if args.partition_by and not args.partition:
            raise ValueError(f"--partition-by {args.partition_by} splits a --partition i/N: "
                             "give one")
        partition = (Partition.parse(args.partition, by=args.partition_by or "district")
                     if args.partition else None)
    except ValueError as e:
        print(f"citygrid ingest: {e}", file=sys.stderr)
        return 2
    client_id = args.client_id or ("citygrid-ingest" if partition is None else
                                   f"citygrid-ingest-p{partition.index}of{partition.count}")
    config = IngestConfig(
        client_id=client_id, group=args.group, partition=partition, batch_size=args.batch_size,
        flush_interval_s=args.flush_interval, receive_maximum=args.receive_maximum,
        report_interval_s=args.report_interval, metrics_port=args.metrics_port,
        **({"topic": args.topic} if args.topic else {}),
    )
    if args.group:  # a broker that drops $share subscriptions would lose every reading
        from citygrid import wire

        if why := wire.group_refusal(settings.mqtt, args.group, client_id):
            print(f"citygrid ingest: {why}", file=sys.stderr)
            return 2
    service = IngestService(settings, open_store(settings), config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.start(timeout_s=None)
    except (StoreAuthError, DatabaseNotFound) as e:
        print(f"citygrid ingest: {e}", file=sys.stderr)
        return 2
    # Each reading makes a few short-lived containers while a batch keeps thousands alive:
    # the default collector thresholds spent ~40% of ingest's per-message time scanning them.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    logging.getLogger("citygrid.ingest").info(
        "ingest running: %s → %s (batch %d, flush %.2fs, receive maximum %d, unknown devices: "
        "%s%s)", settings.mqtt, service.store, config.batch_size, config.flush_interval_s,
        config.receive_maximum, settings.unknown_devices,
        f", partition {partition.index}/{partition.count} of the {partition.by}s" if partition
        else "")
    try:
        stop.wait()
    finally:
        service.stop()
    return 0


def cmd_ingest_dlq(args: argparse.Namespace) -> int:
    from ingest.deadletter import DeadLetterStore

    settings = _settings(args)
    path = Path(settings.data_dir) / "ingest.sqlite"
    if not path.exists():
        print(f"no dead letters: {path} does not exist yet")
        return 0
    store = DeadLetterStore(path)
    counts = store.counts()
    print("dead letters by reason (all time): " +
          (", ".join(f"{r}={n}" for r, n in sorted(counts.items())) or "none"))
    for d in store.latest(args.limit, args.reason):
        when = datetime.fromtimestamp(d.at_ms / 1000, UTC).isoformat(timespec="seconds")
        payload = d.payload[:120].decode("utf-8", "replace")
        print(f"{when}  {d.reason:<15} {d.topic}\n    {d.detail}\n    payload: {payload}")
    return 0
