"""The one place CityGrid makes paho-mqtt clients: MQTT 5, settings-driven."""

from __future__ import annotations

import ssl

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from citygrid.settings import MqttUrl

# One hour: a worker that restarts within it finds its unacknowledged messages waiting.
DEFAULT_SESSION_EXPIRY_S = 3600


def make_client(url: MqttUrl, client_id: str = "", *, manual_ack: bool = False) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5, manual_ack=manual_ack)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set_context(ssl.create_default_context())
    return client


def connect(client: paho.Client, url: MqttUrl, *, clean_start: bool = True,
            session_expiry_s: int = 0, receive_maximum: int | None = None,
            keepalive: int = 30) -> None:
    """Connect (blocking until the TCP connection is up; CONNACK comes via the loop)."""
    props = Properties(PacketTypes.CONNECT)
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum:
        # The broker sends at most this many QoS 1 messages before we acknowledge one:
        # with acks held until the write, this is the in-flight window (FIELD-NOTES).
        props.ReceiveMaximum = receive_maximum
    client.connect(url.host, url.port, keepalive=keepalive, clean_start=clean_start,
                   properties=props)


def message_expiry(seconds: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = seconds
    return props
