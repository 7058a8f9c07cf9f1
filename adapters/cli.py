"""``citygrid adapters …``: ``test`` (profile tests); ``run`` (the service)."""

from __future__ import annotations

import argparse


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("adapters", help="off-the-shelf devices ↔ the contract (device profiles)")
    adapters_sub = p.add_subparsers(dest="adapters_command", required=True, metavar="SUBCOMMAND")

    test = adapters_sub.add_parser("test", help="run YAML profile tests (native messages in, "
                                   "contract readings, acks and commands out)")
    test.add_argument("files", nargs="+")
    test.set_defaults(func=cmd_test)

    doc = adapters_sub.add_parser("asyncapi", help="print the AsyncAPI document of the "
                                  "profiles' native channels (docs/asyncapi-adapters.yaml)")
    doc.add_argument("--profiles", metavar="DIR", help="an operator's profile folder too")
    doc.set_defaults(func=cmd_asyncapi)

    run = adapters_sub.add_parser(
        "run", parents=[common],
        help="the adapters service: registered devices' native topics ⇄ city/v1/…")
    run.add_argument("--client-id", default="citygrid-adapters",
                     help="MQTT client id; the persistent session is keyed by it")
    run.add_argument("--profiles", metavar="DIR",
                     help="a folder of the operator's profiles, beside (or overriding) the "
                          "shipped ones")
    run.add_argument("--receive-maximum", type=int, default=1000,
                     help="native messages the broker may send before one is acknowledged "
                          "(1000)")
    run.add_argument("--report-interval", type=float, default=10.0,
                     help="seconds between self-report log lines (10)")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    run.add_argument("--batch-window-ms", type=float, default=0.0,
                     help="after a read, let the next messages gather this long before "
                          "reading again: less CPU a message, at most this much latency (0)")
    run.set_defaults(func=cmd_run)


def cmd_asyncapi(args: argparse.Namespace) -> int:
    import sys

    from adapters.asyncapi import render
    from adapters.profile import load_profiles

    sys.stdout.write(render(load_profiles(args.profiles)))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """0: every case passed; 1: a case failed; 2: a file (or its profile) could not be used."""
    from adapters.profile import ProfileError
    from adapters.testing import TestFileError, run_file
    from citygrid.casefiles import run_files
    from citygrid.yamlconf import ConfigError

    return run_files(args.files, run_file, (ProfileError, ConfigError, TestFileError),
                     says="cannot run", code=2)


def cmd_run(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; exit 2 at once if a profile does not load."""
    import logging
    import signal
    import sys
    import threading

    from adapters.profile import ProfileError, load_profiles
    from adapters.service import AdapterConfig, AdapterService
    from citygrid.settings import Settings

    settings = Settings.from_env(mqtt_url=args.mqtt_url, data_dir=args.data_dir)
    try:
        profiles = load_profiles(args.profiles)
    except ProfileError as e:
        print(f"citygrid adapters run: a profile does not load:\n{e}", file=sys.stderr)
        return 2
    config = AdapterConfig(client_id=args.client_id, receive_maximum=args.receive_maximum,
                           report_interval_s=args.report_interval,
                           batch_window_s=args.batch_window_ms / 1000,
                           metrics_port=args.metrics_port)
    service = AdapterService(settings, profiles=profiles, registry_dir=settings.data_dir,
                             config=config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service.start(timeout_s=None)
    # As ingest does: the start-up heap (profiles, pydantic models, the inventory) is never
    # garbage; the collector need not scan it on every few hundred allocations.
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    logging.getLogger("citygrid.adapters").info(
        "adapters running: %s, profiles %s, %d registered devices with a profile",
        settings.mqtt, ", ".join(sorted(profiles)), service.stats()["devices"])
    try:
        stop.wait()
    finally:
        service.stop()
    return 0
