"""``citygrid devices …`` and ``citygrid broker …``: the registry and the broker's access files."""

from __future__ import annotations

import argparse
import sys

from citygrid.settings import Settings


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("devices", help="the device registry and per-device MQTT credentials")
    ds = p.add_subparsers(dest="devices_command", required=True, metavar="SUBCOMMAND")
    imp = ds.add_parser("import", parents=[common],
                        help="add or update every device of a fleet GeoJSON file "
                        "(one bad entry refuses the whole file)")
    imp.add_argument("file")
    imp.set_defaults(func=cmd_import)
    exp = ds.add_parser("export", parents=[common],
                        help="the registry as a fleet GeoJSON file (revoked devices left out)")
    exp.add_argument("file", nargs="?", help="write here (default: standard output)")
    exp.set_defaults(func=cmd_export)
    add = ds.add_parser("add", parents=[common],
                        help="register a device; prints its MQTT credentials once")
    add.add_argument("device_id")
    add.add_argument("--kind", required=True, choices=("streetlight", "meter"))
    add.add_argument("--district", required=True)
    add.add_argument("--lat", type=float, required=True)
    add.add_argument("--lon", type=float, required=True)
    add.add_argument("--rated-w", type=float, help="streetlights: power at 100 %%")
    add.add_argument("--account", help="meters: the account billed")
    add.add_argument("--tariff", help="meters: the tariff")
    _entry_options(add)
    add.set_defaults(func=cmd_add)
    ed = ds.add_parser("edit", parents=[common],
                       help="change a device: running services follow within seconds")
    ed.add_argument("device_id")
    ed.add_argument("--district")
    ed.add_argument("--lat", type=float)
    ed.add_argument("--lon", type=float)
    ed.add_argument("--rated-w", type=float)
    ed.add_argument("--account")
    ed.add_argument("--tariff")
    _entry_options(ed)
    ed.set_defaults(func=cmd_edit)
    rev = ds.add_parser("revoke", parents=[common], help="remove a device's access")
    rev.add_argument("device_id")
    rev.set_defaults(func=cmd_revoke)
    ls = ds.add_parser("list", parents=[common], help="registered devices")
    ls.set_defaults(func=cmd_list)

    t = sub.add_parser("tokens", help="API bearer tokens")
    ts = t.add_subparsers(dest="tokens_command", required=True, metavar="SUBCOMMAND")
    tc = ts.add_parser("create", parents=[common], help="create a token; printed once")
    tc.add_argument("--role", required=True, choices=("customer", "viewer", "operator", "admin"))
    tc.add_argument("--name", default="operator", help="who or what it is for")
    tc.add_argument("--account", help="a customer token's account: the one it may see")
    tc.set_defaults(func=cmd_token_create)

    g = sub.add_parser("gateway", parents=[common], help="the operators' HTTP API")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.set_defaults(func=cmd_gateway)

    b = sub.add_parser("broker", help="Mosquitto configuration with CityGrid's access files")
    bs = b.add_subparsers(dest="broker_command", required=True, metavar="SUBCOMMAND")
    conf = bs.add_parser("config", parents=[common], help="write a ready mosquitto.conf")
    conf.add_argument("--port", type=int, default=1883)
    conf.add_argument("--host", default="0.0.0.0")
    conf.add_argument("--user", help="the user Mosquitto runs as (default: you)")
    conf.add_argument("--tls-port", type=int, help="add a TLS listener here (e.g. 8883)")
    conf.add_argument("--cafile", help="TLS: the CA clients' certificates are checked against")
    conf.add_argument("--certfile", help="TLS: the broker's certificate (PEM)")
    conf.add_argument("--keyfile", help="TLS: the broker's private key (PEM)")
    conf.add_argument("--require-certificate", action="store_true",
                      help="TLS: clients must present a certificate signed by --cafile")
    conf.set_defaults(func=cmd_broker_config)
    acc = bs.add_parser("account", parents=[common],
                        help="(re)create a platform service account; prints it once")
    acc.add_argument("name", help="citygrid-ingest, citygrid-rules, citygrid-gateway, "
                     "citygrid-adapters, citygrid-simulator, citygrid-auditor (reads the "
                     "ledger head only)")
    acc.add_argument("--host", default="HOST", help="the broker host for the URL")
    acc.add_argument("--port", default="PORT", help="the broker port for the URL")
    acc.add_argument("--write", help="write the URL to this file (mode 600) instead of printing")
    acc.set_defaults(func=cmd_account)


def _entry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--street", help="streetlights: the street it lights")
    p.add_argument("--max-power-w", type=float,
                   help="meters: what the connection can draw")
    p.add_argument("--profile", dest="device_profile", metavar="PROFILE",
                   help="an off-the-shelf device: its device profile (e.g. tasmota-energy)")
    p.add_argument("--native-id", help="with --profile: the device's own name on its topics")
    p.add_argument("--road", choices=("arterial", "residential", "footpath", "park"),
                   help="streetlights: the road class it lights")
    p.add_argument("--cabinet", help="streetlights: the control cabinet that feeds it")
    p.add_argument("--lamp-type", help="streetlights: its lamp type (see the lamp types file)")


def _data_dir(args: argparse.Namespace) -> str:
    return Settings.from_env(data_dir=args.data_dir).data_dir


def _registry(args: argparse.Namespace):
    from gateway.inventory import registry

    return registry(Settings.from_env(data_dir=args.data_dir))


def _provisioner(args: argparse.Namespace):
    from gateway.provisioning import Provisioner

    return Provisioner(_data_dir(args), _registry(args))


def cmd_import(args: argparse.Namespace) -> int:
    from citygrid.fleet import Fleet, FleetError

    try:
        fleet = Fleet.load(args.file)
    except FleetError as e:
        print(f"citygrid devices import: {e}", file=sys.stderr)
        return 2
    from citygrid.registry import RegistryError

    try:
        n = _registry(args).import_fleet(fleet)
    except RegistryError as e:
        print(f"citygrid devices import: {args.file}: nothing imported:\n{e}", file=sys.stderr)
        return 2
    print(f"imported {n} devices from {args.file}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    fleet = _registry(args).fleet()
    text = fleet.dump()
    if args.file:
        from pathlib import Path

        Path(args.file).write_text(text + "\n")
        print(f"exported {len(fleet)} devices to {args.file}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from citygrid.contract import ContractError
    from citygrid.registry import RegistryError

    changes = {k: v for k, v in (
        ("district", args.district), ("lat", args.lat), ("lon", args.lon),
        ("rated_w", args.rated_w), ("account_id", args.account), ("tariff", args.tariff),
        ("street", args.street), ("max_power_w", args.max_power_w),
        ("device_profile", args.device_profile), ("native_id", args.native_id),
        ("road", args.road), ("cabinet", args.cabinet), ("lamp_type", args.lamp_type))
        if v is not None}
    if not changes:
        print("citygrid devices edit: nothing to change (see --help)", file=sys.stderr)
        return 2
    provisioner = _provisioner(args)
    try:
        before = provisioner.registry.record(args.device_id)
        provisioner.registry.edit(args.device_id, **changes)
    except (ContractError, RegistryError) as e:
        print(f"citygrid devices edit: {e}", file=sys.stderr)
        return 2
    if before and before["status"] == "provisioned" and (
            {"district", "device_profile", "native_id"} & set(changes)):
        provisioner.write_broker_files()  # its topics moved with it
    print(f"edited {args.device_id}: {', '.join(sorted(changes))}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from citygrid.contract import ContractError
    from citygrid.fleet import FleetDevice
    from citygrid.registry import RegistryError
    from gateway.provisioning import ProvisioningError

    device = FleetDevice(args.device_id, args.kind, args.district, args.lat, args.lon,
                         rated_w=args.rated_w, account_id=args.account, tariff=args.tariff,
                         street=args.street, max_power_w=args.max_power_w,
                         device_profile=args.device_profile, native_id=args.native_id,
                         road=args.road, cabinet=args.cabinet, lamp_type=args.lamp_type)
    try:
        creds = _provisioner(args).provision(device)
    except (ContractError, ProvisioningError, RegistryError) as e:
        print(f"citygrid devices add: {e}", file=sys.stderr)
        return 2
    print(f"username: {creds.username}\npassword: {creds.password}\n"
          "(shown once: store it in the device now)")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from gateway.provisioning import ProvisioningError

    try:
        _provisioner(args).revoke(args.device_id)
    except ProvisioningError as e:
        print(f"citygrid devices revoke: {e}", file=sys.stderr)
        return 2
    print(f"revoked {args.device_id}: it can no longer connect")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for device_id, kind, district, status in _registry(args).devices():
        print(f"{device_id:<16} {kind:<12} {district:<16} {status}")
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from gateway.provisioning import TlsListener

    tls = None
    if args.tls_port:
        if not (args.cafile and args.certfile and args.keyfile):
            print("citygrid broker config: --tls-port needs --cafile, --certfile and --keyfile",
                  file=sys.stderr)
            return 2
        tls = TlsListener(args.tls_port, args.cafile, args.certfile, args.keyfile,
                          args.require_certificate)
    conf = _provisioner(args).broker_config(args.port, args.host, args.user, tls)
    print(f"wrote {conf}\nrun: mosquitto -c {conf}")
    return 0


def cmd_account(args: argparse.Namespace) -> int:
    from gateway.provisioning import ProvisioningError

    try:
        creds = _provisioner(args).service_account(args.name)
    except ProvisioningError as e:
        print(f"citygrid broker account: {e}", file=sys.stderr)
        return 2
    url = f"mqtt://{creds.username}:{creds.password}@{args.host}:{args.port}"
    if args.write:
        import os
        from pathlib import Path

        path = Path(args.write)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        os.chmod(path, 0o600)
        path.write_text(url + "\n")
        print(f"wrote {args.name}'s MQTT URL to {path}")
        return 0
    print(f"CITYGRID_MQTT_URL={url}  (shown once)")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from gateway.tokens import create_token

    try:
        token = create_token(_data_dir(args), args.role, args.name, args.account)
    except ValueError as e:
        raise SystemExit(f"citygrid tokens create: {e}") from None
    bound = f" bound to account {args.account}" if args.account else ""
    print(f"{token}\n(a {args.role} token for {args.name}{bound}; shown once, only its hash is "
          "kept)")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = Settings.from_env(mqtt_url=args.mqtt_url, influx_url=args.influx_url,
                                 influx_db=args.influx_db, data_dir=args.data_dir)
    # access_log off: request lines would carry nothing secret, but the app logs its own.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, access_log=False)
    return 0
