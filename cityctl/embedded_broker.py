"""The embedded MQTT broker `citygrid up` falls back to when Mosquitto is not installed.

amqtt, pure Python, MQTT 3.1.1 only (no MQTT 5, no shared subscriptions), about 1,200
QoS 1 messages/s on the 2-core reference machine (docs/platform-facts.md): enough for the
demo at a longer reporting interval, not for production. Anonymous, bound to 127.0.0.1 only.

    python -m cityctl.embedded_broker PORT
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys


def config(port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}",
                                  "max_connections": 5000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                    {"allow_anonymous": True}},
    }


async def _serve(port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(config(port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("citygrid.broker").info("embedded broker (amqtt) on 127.0.0.1:%d", port)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    asyncio.run(_serve(int(argv[0]) if argv else 1883))
    return 0


if __name__ == "__main__":
    sys.exit(main())
