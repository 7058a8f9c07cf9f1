"""How the gateway sends to the broker: operators' overrides go to the rule engine over MQTT
(it arbitrates them above every rule). ``create_app`` takes any :class:`Publisher`."""

from __future__ import annotations

import threading
from typing import Any, Protocol

from citygrid.settings import MqttUrl


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes) -> None:
        """Send ``payload`` to ``topic`` (QoS 1); raise OSError, RuntimeError or ValueError
        when the broker does not take it."""


class MqttPublisher:
    """Connects on the first message (an app that never overrides never connects), then keeps
    the connection; each publish waits up to ``timeout_s`` for the broker's acknowledgement."""

    def __init__(self, mqtt: MqttUrl, client_id: str = "citygrid-gateway",
                 timeout_s: float = 5):
        self.mqtt, self.client_id, self.timeout_s = mqtt, client_id, timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    def _connected(self) -> Any:
        with self._lock:
            if self._client is None:
                from citygrid import mqtt

                client = mqtt.make_client(self.mqtt, self.client_id)
                mqtt.connect(client, self.mqtt)
                client.loop_start()
                self._client = client
            return self._client

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._connected().publish(topic, payload, qos=1)
        info.wait_for_publish(self.timeout_s)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.loop_stop()
            client.disconnect()


__all__ = ["MqttPublisher", "Publisher"]
