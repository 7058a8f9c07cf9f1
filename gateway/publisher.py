"""How the gateway sends to the broker: operators' overrides go to the rule engine over MQTT
(it arbitrates them above every rule). ``create_app`` takes any :class:`Publisher`."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Protocol

from citygrid.settings import MqttUrl

if TYPE_CHECKING:
    from citygrid.wire import Client


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes) -> None:
        """Send ``payload`` to ``topic`` (QoS 1); raise OSError, RuntimeError or ValueError
        when the broker does not take it."""


class MqttPublisher:
    """Connects on the first message (an app that never overrides never connects), then keeps
    the connection (``citygrid.wire``, reconnecting by itself); each publish waits up to
    ``timeout_s`` for the broker's acknowledgement.

    A publish the broker has not acknowledged in time raises ``TimeoutError`` (an OSError),
    and the connection it was queued on is given up with it: an override the operator was told
    failed is not sent later, when the broker is back. The next publish connects anew."""

    def __init__(self, mqtt: MqttUrl, client_id: str = "citygrid-gateway",
                 timeout_s: float = 5):
        self.mqtt, self.client_id, self.timeout_s = mqtt, client_id, timeout_s
        self._client: Client | None = None
        self._lock = threading.Lock()

    def _connected(self) -> Client:
        with self._lock:
            if self._client is None:
                from citygrid.wire import Client

                client = Client(self.mqtt, self.client_id).start()
                deadline = time.monotonic() + self.timeout_s
                # The first attempt's failure is the answer (as a refused connection was):
                # the client's backoff is not waited out here.
                while not client.wait_connected(0.02):
                    if client.last_error is not None or time.monotonic() >= deadline:
                        why = client.last_error or f"no connection within {self.timeout_s} s"
                        client.stop()
                        raise ConnectionError(f"MQTT {self.mqtt}: {why}")
                self._client = client
            return self._client

    def publish(self, topic: str, payload: bytes) -> None:
        from citygrid.wire import MqttError

        client = self._connected()
        try:
            mid = client.publish(topic, payload, qos=1)
        except MqttError as e:  # 65,535 publishes unacknowledged
            raise RuntimeError(f"MQTT {self.mqtt}: {e}") from e
        if not client.wait_acknowledged(mid, self.timeout_s):
            self._give_up(client)
            why = f" ({client.last_error})" if client.last_error else ""
            raise TimeoutError(f"the broker at {self.mqtt} did not acknowledge the publish "
                               f"within {self.timeout_s} s{why}")

    def _give_up(self, client: Client) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        client.stop()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.stop()


__all__ = ["MqttPublisher", "Publisher"]
