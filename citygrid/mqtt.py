"""paho-mqtt clients for tools, benchmarks and tests (MQTT 5 or 3.1.1, settings-driven), and
the view-only city watch. The services' hot paths use citygrid.wire."""

from __future__ import annotations

import itertools
import ssl
import time

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from citygrid.settings import MqttUrl


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
    if len(url.nodes) > 1:  # a cluster: every reconnect goes to the next node, in turn
        tries = itertools.count()

        def next_node(c: paho.Client, _userdata) -> None:
            # paho connects to _host (its TLS checks that name): the node this try is for.
            c._host, c._port = url.nodes[next(tries) % len(url.nodes)]  # noqa: SLF001

        client.on_pre_connect = next_node
    return client


def connect(client: paho.Client, url: MqttUrl, *, clean_start: bool = True,
            session_expiry_s: int = 0, receive_maximum: int | None = None,
            keepalive: int = 30, wait: bool = True) -> None:
    """Connect; CONNACK comes via the loop.

    ``wait=False`` returns at once and lets paho's loop keep trying (a service that
    starts before its broker); ``wait=True`` raises if the broker is not there — with a
    cluster's nodes (``make_client`` made the client for them), if none of them is.
    """
    tries = len(url.nodes) if wait else 1
    for i in range(tries):
        try:
            return _connect_once(client, url, clean_start, session_expiry_s, receive_maximum,
                                 keepalive, wait)
        except OSError:
            if i == tries - 1:
                raise


def _connect_once(client: paho.Client, url: MqttUrl, clean_start: bool, session_expiry_s: int,
                  receive_maximum: int | None, keepalive: int, wait: bool) -> None:
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
