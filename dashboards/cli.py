"""``citygrid dashboards build | push``: Grafana dashboards built from code."""

from __future__ import annotations

import argparse


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("dashboards", help="Grafana dashboards built from code")
    dsub = d.add_subparsers(dest="dashboards_command", required=True, metavar="SUBCOMMAND")
    b = dsub.add_parser("build", help="regenerate dashboards/json from dashboards/build.py")
    b.set_defaults(func=cmd_build)
    pu = dsub.add_parser("push", help="upload the datasource and dashboards to a Grafana")
    pu.add_argument("--url", required=True, help="Grafana base URL")
    pu.add_argument("--token", required=True, help="a Grafana service-account token")
    pu.add_argument("--influx-url", required=True, help="InfluxDB URL as Grafana reaches it")
    pu.add_argument("--influx-db", default="citygrid")
    pu.add_argument("--influx-token", help="for InfluxDB 2.x/3 Core (v1 API)")
    pu.set_defaults(func=cmd_push)


def cmd_build(args: argparse.Namespace) -> int:
    from dashboards.build import build

    for path in build():
        print(f"wrote {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from dashboards.push import push

    for line in push(args.url, args.token, args.influx_url, args.influx_db, args.influx_token):
        print(line)
    return 0
