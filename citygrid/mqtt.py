"""The one place CityGrid makes paho-mqtt clients: MQTT 5 (or 3.1.1), settings-driven."""

from __future__ import annotations

import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from citygrid.settings import MqttUrl

# One hour: a worker that restarts within it finds its unacknowledged messages waiting.
DEFAULT_SESSION_EXPIRY_S = 3600


class InboundMessage(Protocol):
    """What a consumer reads of a received PUBLISH (paho's ``MQTTMessage`` has it)."""

    topic: str
    payload: bytes
    mid: int
    qos: int


class ConsumerClient(Protocol):
    """The part of a paho client a consumer that acknowledges by hand uses (ingest): what
    ``connect()`` and ``ack_many()`` call, the loop, and paho's VERSION2 callbacks::

        on_connect(client, userdata, flags, reason_code, properties)
        on_subscribe(client, userdata, mid, reason_codes, properties)
        on_disconnect(client, userdata, flags, reason_code, properties)
        on_message(client, userdata, message: InboundMessage)

    ``paho.Client`` is one; a test's fake is another (no broker needed).
    """

    protocol: int  # paho.MQTTv5 or paho.MQTTv311
    on_connect: Callable[..., None] | None
    on_subscribe: Callable[..., None] | None
    on_disconnect: Callable[..., None] | None
    on_message: Callable[..., None] | None

    def connect_async(self, host: str, port: int = 1883, keepalive: int = 60,
                      bind_address: str = "", bind_port: int = 0, clean_start: Any = ...,
                      properties: Properties | None = None) -> None: ...

    def reconnect_delay_set(self, min_delay: int = 1, max_delay: int = 120) -> None: ...

    def subscribe(self, topic: Any, qos: int = 0, options: Any = None,
                  properties: Properties | None = None) -> tuple[Any, int | None]: ...

    def ack(self, mid: int, qos: int) -> Any: ...

    def loop_start(self) -> Any: ...

    def loop_stop(self) -> Any: ...

    def disconnect(self, reasoncode: Any = None, properties: Properties | None = None) -> Any: ...


def make_client(url: MqttUrl, client_id: str = "", *, manual_ack: bool = False,
                protocol: int | None = None) -> paho.Client:
    """A client speaking ``protocol`` (default: the settings' CITYGRID_MQTT_PROTOCOL)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=protocol or url.protocol, manual_ack=manual_ack)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        # The system's CAs, or the one CITYGRID_MQTT_CA names; hostname checked either way.
        context = ssl.create_default_context(cafile=url.ca_file)
        if url.cert_file:
            context.load_cert_chain(url.cert_file, url.key_file)
        client.tls_set_context(context)
    return client


def connect(client: paho.Client | ConsumerClient, url: MqttUrl, *, clean_start: bool = True,
            session_expiry_s: int = 0, receive_maximum: int | None = None,
            keepalive: int = 30, wait: bool = True) -> None:
    """Connect; CONNACK comes via the loop.

    ``wait=False`` returns at once and lets paho's loop keep trying (a service that
    starts before its broker); ``wait=True`` raises if the broker is not there.
    """
    if client.protocol != paho.MQTTv5:  # 3.1.1: no properties, clean session by flag
        # paho takes clean_session in the constructor for 3.1.1; a persistent session
        # (ingest) is one that is not clean. Session expiry does not exist in 3.1.1.
        client._clean_session = clean_start  # noqa: SLF001 (paho 2.x, pinned)
        (client.connect if wait else client.connect_async)(url.host, url.port,
                                                           keepalive=keepalive)
        return
    props = Properties(PacketTypes.CONNECT)
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum:
        # The broker sends at most this many QoS 1 messages before we acknowledge one:
        # with acks held until the write, this is the in-flight window (docs/platform-facts.md).
        props.ReceiveMaximum = receive_maximum
    (client.connect if wait else client.connect_async)(
        url.host, url.port, keepalive=keepalive, clean_start=clean_start, properties=props)


def message_expiry(client: paho.Client, seconds: int) -> Properties | None:
    """A PUBLISH's message expiry, for MQTT 5 clients (3.1.1 has none)."""
    if client.protocol != paho.MQTTv5:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = seconds
    return props


_PUBACK = struct.Struct("!BBH")  # fixed header 0x40, remaining length 2, packet id


def ack_many(client: paho.Client | ConsumerClient, mids: list[int]) -> None:
    """Acknowledge many QoS 1 messages in one write.

    paho's ``ack()`` queues one packet and wakes its loop once per message, which
    costs ingest more than the rest of its per-message work; MQTT is a byte
    stream, so the PUBACKs can go out back to back as one buffer.
    """
    if not mids:
        return
    queue = getattr(client, "_packet_queue", None)
    if queue is None:  # a paho without the internal we lean on: the slow, public way
        for mid in mids:
            client.ack(mid, 1)
        return
    queue(0x40, b"".join([_PUBACK.pack(0x40, 2, mid) for mid in mids]), 0, 0)


def watch_city(url: MqttUrl, on_event):
    """A view-only client (the gateway's feed, `citygrid up`'s summary): telemetry, commands
    and settlements at QoS 0, connecting in the background (citygrid.wire: every message of
    one read decoded in one call). Stop it with ``.stop()``.

    ``on_event(topic, readings, body)``: for telemetry the decoded readings (body None),
    otherwise the JSON object (readings None); what does not decode is not passed on.
    """
    import orjson

    from citygrid.contract import ContractError, Topic, decode_readings, topic_filter
    from citygrid.wire import Client

    topics: dict[str, Topic] = {}

    def on_messages(messages) -> None:
        now_ms = int(time.time() * 1000)
        for message in messages:
            try:
                t = topics.get(message.topic)
                if t is None:
                    if len(topics) > 100_000:
                        topics.clear()
                    t = topics[message.topic] = Topic.parse(message.topic)
                if t.channel == "telemetry":
                    on_event(t, decode_readings(t.kind, message.payload, now_ms=now_ms), None)
                    continue
                body = orjson.loads(message.payload)
            except (ContractError, orjson.JSONDecodeError):
                continue
            if isinstance(body, dict):
                on_event(t, None, body)

    return Client(url, "", subscriptions=[
        (topic_filter(), 0), (topic_filter("cmd", kind="streetlight"), 0),
        (topic_filter("settlement", kind="meter"), 0)], on_messages=on_messages,
        keepalive=60, read_interval_s=0.25).start()  # a view: four reads a second are plenty
