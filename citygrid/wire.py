"""CityGrid's own MQTT client: a socket, a sans-I/O codec, and batches.

Why not paho: paho parses, queues and calls back one message at a time and wakes its loop
once per acknowledgement; that cost ~40 µs a message here, more than the whole of what
ingest does with a reading (docs/benchmarks.md, "The MQTT client"). This client reads
everything the socket holds in one ``recv`` (up to 1 MiB), frames every packet of it in a
tight loop, hands the service **one list of PUBLISHes per read**, and sends whatever the
service answers — PUBACKs, commands — as **one write**.

The codec: MQTT 5 control packets (CONNECT with its properties and Will, CONNACK, SUBACK,
DISCONNECT) are encoded and decoded by ``mqtt5`` (a sans-I/O MQTT 5 codec in Rust, PyPI),
which gives their reason codes and strings. The hot packets — PUBLISH in and out, PUBACK —
are framed here in Python: measured against ``mqtt5.read`` on the same buffer they cost the
same (~1.3–1.5 µs a message, ``bench/mqtt_client.py --codec``), and one framing serves both
protocol versions. MQTT 3.1.1 (the embedded broker, brokers without MQTT 5), which ``mqtt5``
does not speak, is hand-encoded here: its control packets are a few fixed fields.

What it covers — what CityGrid uses: MQTT 5 and 3.1.1; TLS with the system's or a named CA
and client certificates; username and password; persistent sessions (clean start off,
session expiry); Receive Maximum both ways (the window the broker may send us, and the
broker's window for our QoS 1 publishes, held back here beyond it); message expiry;
shared subscriptions (they are topic filters); keepalive; retained messages; a Last Will;
reconnect with exponential backoff and jitter, re-subscribing and re-sending unacknowledged
QoS 1 publishes (DUP) on every new connection. QoS 2 is not used by CityGrid: subscriptions
grant at most QoS 1 and publishes are QoS 0 or 1.

Threads: one I/O thread per client (``start()``), or the service's own thread calling
``loop()``. Callbacks run on the I/O thread. ``publish()`` and ``ack()`` may be called from
any thread: from the I/O thread (inside a callback) they join the loop turn's one write;
from another thread they are written at once under a lock (plain TCP) or handed to the I/O
thread with a wake-up (TLS, whose state one thread must own).
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import mqtt5

from citygrid.settings import MqttUrl

log = logging.getLogger("citygrid.mqtt")

MQTT5, MQTT311 = 5, 4  # the protocol levels (paho's numbers too)
# A persistent session's expiry: a service that restarts within an hour finds its
# unacknowledged messages waiting.
SESSION_EXPIRY_S = 3600
# One read takes up to 1 MiB, into a buffer kept for the connection: ``recv(1 MiB)`` would
# allocate (and give back) a 1 MiB object on every read, ~25 µs a call on the reference
# machine even when 40 bytes came, more than the read's own work at a quiet moment.
READ_SIZE = 1 << 20
_U16 = struct.Struct("!H")
_PUBACK = struct.Struct("!BBH")
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"


class MqttError(Exception):
    """The broker refused us (CONNACK, SUBACK) or the connection broke."""


class Message:
    """A received PUBLISH. ``mid`` is its packet id (0 at QoS 0); acknowledge a QoS 1
    message with ``Client.ack([mid], epoch)`` once it is taken."""

    __slots__ = ("topic", "payload", "mid", "qos", "retain", "epoch")

    def __init__(self, topic: str, payload: bytes, mid: int, qos: int, retain: bool,
                 epoch: int):
        self.topic, self.payload, self.mid = topic, payload, mid
        self.qos, self.retain, self.epoch = qos, retain, epoch

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {len(self.payload)} bytes, mid={self.mid})"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


# --- the codec -------------------------------------------------------------------------

def vbi(n: int) -> bytes:
    """A Variable Byte Integer (remaining length, property length)."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        b, n = n & 127, n >> 7
        out.append(b | 128 if n else b)
        if not n:
            return bytes(out)


def utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return _U16.pack(len(b)) + b


def encode_publish(topic: str | bytes, payload: bytes, qos: int = 0, retain: bool = False,
                   packet_id: int = 0, *, v5: bool = True, expiry_s: int | None = None,
                   dup: bool = False) -> bytes:
    """One PUBLISH packet. The simulator pre-encodes the fixed parts of these."""
    t = topic.encode() if isinstance(topic, str) else topic
    var = _U16.pack(len(t)) + t
    if qos:
        var += _U16.pack(packet_id)
    if v5:
        var += b"\x05\x02" + struct.pack("!I", expiry_s) if expiry_s else b"\x00"
    head = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    return bytes((head,)) + vbi(len(var) + len(payload)) + var + payload


def encode_acks(mids: Iterable[int]) -> bytes:
    """PUBACKs, back to back (MQTT is a byte stream): one buffer for one write."""
    pack = _PUBACK.pack
    return b"".join([pack(0x40, 2, m) for m in mids])


def _connect_311(client_id: str, clean: bool, keepalive: int, username: str | None,
                 password: str | None, will: Will | None) -> bytes:
    flags = 0x02 if clean else 0
    payload = utf8(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += utf8(will.topic) + utf8(will.payload)
    if username is not None:
        flags |= 0x80
        payload += utf8(username)
        if password is not None:
            flags |= 0x40
            payload += utf8(password)
    var = b"\x00\x04MQTT\x04" + bytes((flags,)) + _U16.pack(keepalive)
    return b"\x10" + vbi(len(var) + len(payload)) + var + payload


def _subscribe_311(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    body = _U16.pack(packet_id) + b"".join(utf8(t) + bytes((q,)) for t, q in filters)
    return b"\x82" + vbi(len(body)) + body


def frame(buf: bytes, start: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """Every whole packet in ``buf[start:]``: ``(first byte, body start, body end)``, and
    where the first incomplete packet begins."""
    out = []
    n = len(buf)
    off = start
    while off + 2 <= n:
        i = off + 1
        b = buf[i]
        if b < 128:
            rl = b
            i += 1
        else:
            rl, mul = 0, 1
            while True:
                if i >= n:
                    return out, off
                b = buf[i]
                rl += (b & 127) * mul
                i += 1
                if b < 128:
                    break
                mul <<= 7
                if mul > 1 << 21:
                    raise MqttError("malformed remaining length")
        end = i + rl
        if end > n:
            break
        out.append((buf[off], i, end))
        off = end
    return out, off


# --- the client ------------------------------------------------------------------------

class Client:
    """An MQTT client for one service connection; see the module's docstring.

    ``on_messages(messages)`` gets every PUBLISH of one read; ``on_connect(session_present)``
    each accepted CONNACK (after the subscriptions are sent); ``on_published(mids)`` the QoS
    1 publishes the broker acknowledged in one read; ``on_disconnect(reason)`` each lost or
    closed connection.
    """

    def __init__(self, url: MqttUrl, client_id: str = "", *, protocol: int | None = None,
                 clean_start: bool = True, session_expiry_s: int = 0,
                 receive_maximum: int | None = None, keepalive: int = 30,
                 will: Will | None = None, subscriptions: Sequence[tuple[str, int]] = (),
                 on_messages: Callable[[list[Message]], None] | None = None,
                 on_connect: Callable[[bool], None] | None = None,
                 on_published: Callable[[list[int]], None] | None = None,
                 on_disconnect: Callable[[str], None] | None = None,
                 max_inflight: int = 1000, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, connect_timeout_s: float = 10.0,
                 read_interval_s: float = 0.0):
        self.url, self.client_id = url, client_id
        self.protocol = protocol or url.protocol
        self.v5 = self.protocol == MQTT5
        self.clean_start, self.session_expiry_s = clean_start, session_expiry_s
        self.receive_maximum, self.keepalive, self.will = receive_maximum, keepalive, will
        self.subscriptions = list(subscriptions)
        self.on_messages, self.on_connect = on_messages, on_connect
        self.on_published, self.on_disconnect = on_published, on_disconnect
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        # At most one read of the socket per interval: at a low rate, many messages a read
        # instead of a wake-up, a system call and a callback each (what arrives meanwhile
        # waits in the socket's buffer). For views and for ingest, whose batches wait anyway.
        self.read_interval_s = read_interval_s
        self._read_at = 0.0
        # Our QoS 1 publishes: at most this many unacknowledged at once (the broker's Receive
        # Maximum lowers it), the rest wait here in order.
        self._max_inflight = self._window = max_inflight
        self._inflight: dict[int, bytes] = {}
        self._waiting: deque[tuple[int, bytes]] = deque()
        self._next_id = 0
        self.epoch = 0  # +1 for every connection: a message id means nothing on another
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.refused: list[tuple[str, int]] = []  # subscriptions the broker refused
        # During on_published: the publishes of those ids the broker refused (MQTT 5 PUBACK
        # reason ≥ 0x80, e.g. 0x87 not authorized), id → reason code; they are in the ids too.
        self.refused_publishes: dict[int, int] = {}
        self.last_error: str | None = None
        self._sock: socket.socket | ssl.SSLSocket | None = None
        self._out = bytearray()
        self._lock = threading.RLock()  # the socket's writes, _out, the in-flight table
        self._turn_lock = threading.Lock()  # one loop turn at a time, and stop() after it
        self._io_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._cork = 0
        self._in_loop = False
        self._io_owner: threading.Thread | None = None
        self._in = b""
        self._rbuf = bytearray(READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._requests: dict[int, list[tuple[str, int]]] = {}  # SUBSCRIBE/UNSUBSCRIBE ids
        self._last_sent = self._last_recv = time.monotonic()
        self._ping_out = False
        self._delay = reconnect_min_s
        # The node of the cluster (url.nodes) tried next, and failed tries since the last
        # connection: the backoff doubles once every node has been tried.
        self._node, self._failed = 0, 0
        self.stats = {"received": 0, "published": 0, "reads": 0, "connects": 0,
                      "failovers": 0}

    # -- the service's side --

    def start(self) -> Client:
        """Connect and run the I/O loop on a thread of its own, reconnecting until ``stop()``."""
        self._io_thread = threading.Thread(target=self.loop_forever,
                                           name=f"mqtt-{self.client_id or 'client'}",
                                           daemon=True)
        self._io_thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send DISCONNECT (a normal one: the Will is not published) and close."""
        self._stopping.set()
        self._wake()
        if self._io_thread is not None and self._io_thread is not threading.current_thread():
            self._io_thread.join(timeout_s)
        # A service driving loop() itself: its turn in progress ends first (no race on the
        # socket), and no new one starts.
        got_turn = self._turn_lock.acquire(timeout=timeout_s)
        try:
            with self._lock:
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        # Whole packets only: what is queued goes out completely, then DISCONNECT
                        # (a packet cut in half would break the stream, and the broker would
                        # publish the Will).
                        self._sock.setblocking(True)
                        self._sock.settimeout(1.0)
                        self._sock.sendall(bytes(self._out) + _DISCONNECT)
                        self._out.clear()
                    self._close()
        finally:
            if got_turn:
                self._turn_lock.release()

    def wait_connected(self, timeout_s: float | None) -> bool:
        return self.connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                expiry_s: int | None = None) -> int:
        """Queue one PUBLISH; its packet id (0 at QoS 0). A QoS 1 publish is kept until the
        broker acknowledges it, and sent again (DUP) on a new connection."""
        with self._lock:
            if not qos:
                self._send(encode_publish(topic, payload, 0, retain, v5=self.v5,
                                          expiry_s=expiry_s))
                return 0
            mid = self._new_id()
            packet = encode_publish(topic, payload, 1, retain, mid, v5=self.v5,
                                    expiry_s=expiry_s)
            if len(self._inflight) < self._window and not self._waiting:
                self._inflight[mid] = packet
                if self.connected.is_set():
                    self._send(packet)
            else:
                self._waiting.append((mid, packet))
            return mid

    @contextlib.contextmanager
    def corked(self):
        """Everything published or acknowledged inside goes out as one write at the end (a
        burst from a thread other than the loop's: the simulator's tick, a bulk override),
        instead of a system call each."""
        with self._lock:
            self._cork += 1
        try:
            yield self
        finally:
            with self._lock:
                self._cork -= 1
                if not self._cork and self._out:
                    self._send(b"")

    def publish_encoded(self, packets: bytes, count: int = 1) -> None:
        """Send ready-made QoS 0 PUBLISH packets as they are (the simulator's pre-encoded
        readings): no copy, no per-message work here."""
        with self._lock:
            self.stats["published"] += count
            self._send(packets)

    def ack(self, mids: Sequence[int], epoch: int | None = None) -> None:
        """Acknowledge QoS 1 messages of connection ``epoch`` (default: this one) in one
        write. Ids from an earlier connection are dropped: the broker sends those again."""
        if not mids:
            return
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return
            if self.connected.is_set():
                self._send(encode_acks(mids))

    @property
    def inflight(self) -> int:
        return len(self._inflight) + len(self._waiting)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every QoS 1 publish so far is acknowledged (someone must be running the
        loop meanwhile: the client's own thread, or the service's between its calls)."""
        deadline = time.monotonic() + timeout_s
        while self.inflight:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # -- the loop --

    def loop_forever(self) -> None:
        while not self._stopping.is_set():
            self.loop(1.0)

    def loop(self, timeout_s: float = 1.0) -> bool:
        """One turn: connect if need be (waiting out the backoff), else read what arrived
        within ``timeout_s``, call back, write. False when there is no connection."""
        with self._turn_lock:
            if self._stopping.is_set() and self._sock is not None:
                return False  # stop() says goodbye
            return self._loop(timeout_s)

    def _loop(self, timeout_s: float) -> bool:
        if self._sock is None:
            if self._stopping.is_set():
                return False
            try:
                self._connect()
            except (OSError, MqttError) as e:
                self.last_error = str(e)
                tried = self.node
                delay = random.uniform(self._delay / 2, self._delay)  # jitter: no herd
                self._failed += 1
                self._node = (self._node + 1) % len(self.url.nodes)  # the next node, if any
                if self._failed % len(self.url.nodes) == 0:
                    self._delay = min(self._delay * 2, self.reconnect_max_s)
                log.warning("MQTT %s at %s: %s; %s in %.1f s", self.client_id or "client",
                            tried, e, f"next {self.node}" if tried != self.node else "again",
                            delay)
                self._stopping.wait(delay)
                return False
        try:
            self._turn(timeout_s)
            return True
        except (OSError, MqttError) as e:
            self._lost(str(e))
            return False

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\x00")

    def _send(self, data: bytes) -> None:
        """Under the lock. In the loop: into the turn's one write. Elsewhere: at once on
        plain TCP; over TLS, to the I/O thread (one thread owns the TLS state)."""
        self._out += data
        if self._cork or (self._in_loop and threading.current_thread() is self._io_owner):
            return
        if self.url.tls:
            self._wake()
        else:
            with contextlib.suppress(OSError):
                self._flush_now()
            if self._out:
                self._wake()

    def _flush_now(self) -> None:
        sock = self._sock
        if sock is None or not self._out:
            return
        try:
            n = sock.send(self._out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        del self._out[:n]
        self._last_sent = time.monotonic()

    def _new_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight and self._next_id not in self._requests:
                return self._next_id
        raise MqttError("65,535 publishes unacknowledged")

    @property
    def node(self) -> str:
        """The broker node connected to (or tried next): ``host:port``."""
        host, port = self.url.nodes[self._node % len(self.url.nodes)]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _connect(self) -> None:
        url = self.url.node(self._node)  # its host is checked against the node's certificate
        raw = socket.create_connection((url.host, url.port), timeout=self.connect_timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket | ssl.SSLSocket = raw
        try:
            if url.tls:
                context = ssl.create_default_context(cafile=url.ca_file)
                if url.cert_file:
                    context.load_cert_chain(url.cert_file, url.key_file)
                sock = context.wrap_socket(raw, server_hostname=url.host)
            sock.sendall(self._connect_packet())
            buf = b""
            deadline = time.monotonic() + self.connect_timeout_s
            while True:
                packets, _ = frame(buf)
                if packets:
                    break
                if time.monotonic() > deadline:
                    raise MqttError("no CONNACK")
                chunk = sock.recv(65536)
                if not chunk:
                    raise MqttError("the broker closed the connection at CONNECT")
                buf += chunk
            first, start, end = packets[0]
            if first >> 4 != 2:
                raise MqttError(f"expected CONNACK, got packet type {first >> 4}")
            session_present = self._connack(buf[:end], buf[start:end])
            rest = buf[end:]
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        with self._lock:
            self._sock = sock
            self._in = rest
            self.epoch += 1
            self.stats["connects"] += 1
            self._last_sent = self._last_recv = time.monotonic()
            self._ping_out = False
            self._delay = self.reconnect_min_s
            self._failed = 0
            self._requests.clear()
            if self.subscriptions:
                self._out += self._subscribe_packet(self.subscriptions)
            else:
                self.subscribed.set()
            # What the broker never acknowledged goes again, marked DUP, then the queue.
            for packet in self._inflight.values():
                self._out += bytes((packet[0] | 8,)) + packet[1:]
            self._fill_window()
            self.connected.set()
        self.last_error = None
        log.info("MQTT %s connected to %s (session present: %s)", self.client_id or "client",
                 url, session_present)
        if self.stats["connects"] > 1 and len(self.url.nodes) > 1:
            log.info("MQTT %s is on node %s of %s", self.client_id or "client", self.node,
                     self.url)
        if self.on_connect is not None:
            self.on_connect(session_present)
        with self._lock:
            self._flush_now()
        if self._in:  # what the broker sent right behind the CONNACK (a session's backlog)
            self._process(self._in)

    def _connect_packet(self) -> bytes:
        url = self.url
        if not self.v5:
            return _connect_311(self.client_id, self.clean_start, self.keepalive, url.username,
                                url.password, self.will)
        will = None
        if self.will is not None:
            will = mqtt5.Will(self.will.topic, payload=self.will.payload,
                              qos=mqtt5.QoS(self.will.qos), retain=self.will.retain)
        return mqtt5.ConnectPacket(
            self.client_id, username=url.username,
            password=url.password.encode() if url.password is not None else None,
            clean_start=self.clean_start, will=will, keep_alive=self.keepalive,
            session_expiry_interval=self.session_expiry_s,
            receive_max=self.receive_maximum or 65535).write()

    def _connack(self, packet: bytes, body: bytes) -> bool:
        if not self.v5:
            if len(body) < 2:
                raise MqttError("short CONNACK")
            if body[1]:
                reasons = {1: "unacceptable protocol version", 2: "identifier rejected",
                           3: "server unavailable", 4: "bad user name or password",
                           5: "not authorized"}
                raise MqttError(f"broker refused: {reasons.get(body[1], body[1])}")
            return bool(body[0] & 1)
        ack, _ = mqtt5.read(memoryview(packet))
        if ack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            why = f" ({ack.reason_str})" if ack.reason_str else ""
            reason = ack.reason_code.name.lower().replace("_", " ")
            raise MqttError(f"broker refused: {reason}{why}")
        self._window = min(self._max_inflight, ack.receive_max or 65535)
        if ack.server_keep_alive:
            self.keepalive = ack.server_keep_alive
        return ack.session_present

    def _subscribe_packet(self, filters: Sequence[tuple[str, int]]) -> bytes:
        packet_id = self._new_id()
        self._requests[packet_id] = list(filters)
        if not self.v5:
            return _subscribe_311(packet_id, filters)
        return mqtt5.SubscribePacket(packet_id, [
            mqtt5.TopicFilter(t, max_qos=mqtt5.QoS(q)) for t, q in filters]).write()

    def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        """Add subscriptions (kept for every later connection); sent now when connected."""
        with self._lock:
            new = [f for f in filters if f not in self.subscriptions]
            if not new:
                return
            self.subscriptions += new
            if self.connected.is_set():
                self._send(self._subscribe_packet(new))

    def unsubscribe(self, topics: Sequence[str]) -> None:
        """Drop subscriptions by topic filter, sent now when connected — also filters this
        client never subscribed to itself (an earlier run's, still in a persistent session)."""
        with self._lock:
            gone = list(dict.fromkeys(topics))
            if not gone:
                return
            self.subscriptions = [f for f in self.subscriptions if f[0] not in set(gone)]
            if not self.connected.is_set():
                return
            packet_id = self._new_id()
            self._requests[packet_id] = []
            if self.v5:
                packet = mqtt5.UnsubscribePacket(packet_id, gone).write()
            else:
                body = _U16.pack(packet_id) + b"".join(utf8(t) for t in gone)
                packet = b"\xa2" + vbi(len(body)) + body
            self._send(packet)

    def acknowledged(self, mid: int) -> bool:
        """Whether the broker has acknowledged our QoS 1 publish ``mid``."""
        with self._lock:
            return mid not in self._inflight and all(m != mid for m, _p in self._waiting)

    def wait_acknowledged(self, mid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.acknowledged(mid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def _fill_window(self) -> None:
        while self._waiting and len(self._inflight) < self._window:
            mid, packet = self._waiting.popleft()
            self._inflight[mid] = packet
            self._out += packet

    def _turn(self, timeout_s: float) -> None:
        sock = self._sock
        assert sock is not None
        with self._lock:
            self._flush_now()
            want_write = bool(self._out)
        if self.read_interval_s:
            hold = self._read_at + self.read_interval_s - time.monotonic()
            if hold > 0:  # only writes meanwhile (a wake-up from another thread's publish)
                readable, _, _ = select.select([self._wake_r], [], [], min(hold, timeout_s))
                if readable:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    self._woken = False
                    with self._lock:
                        self._flush_now()
                return
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not pending:
            readable, writable, _ = select.select(
                [sock, self._wake_r], [sock] if want_write else [], [],
                self._timeout(timeout_s))
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
                self._woken = False
        else:
            readable = [sock]
        if sock in readable:
            self._read(sock)
            self._read_at = time.monotonic()
        self._keepalive()

    def _timeout(self, timeout_s: float) -> float:
        if not self.keepalive or self._ping_out:
            return timeout_s
        quiet = min(self._last_sent, self._last_recv) + self.keepalive
        return max(0.0, min(timeout_s, quiet - time.monotonic()))

    def _keepalive(self) -> None:
        """A PINGREQ when we have sent nothing for a keepalive (the broker's rule) or heard
        nothing (ours: a publisher that only sends must still learn that the broker is gone);
        no answer in half a keepalive more and the connection is given up."""
        if not self.keepalive:
            return
        now = time.monotonic()
        if now - self._last_recv > self.keepalive * 1.5:
            raise MqttError(f"no packet from the broker in {self.keepalive * 1.5:.0f} s")
        quiet = now - min(self._last_sent, self._last_recv)
        if quiet >= self.keepalive and not self._ping_out:
            with self._lock:
                self._out += _PINGREQ
                self._ping_out = True
                self._flush_now()

    def _read(self, sock) -> None:
        try:
            n = sock.recv_into(self._rbuf)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        if not n:
            raise MqttError("the broker closed the connection")
        data = self._rview[:n].tobytes()
        if isinstance(sock, ssl.SSLSocket):
            while sock.pending():
                data += sock.recv(sock.pending())
        self._last_recv = time.monotonic()
        self._ping_out = False
        self.stats["reads"] += 1
        self._process(self._in + data if self._in else data)

    def _process(self, buf: bytes) -> None:
        """Every whole packet in ``buf``: PUBLISHes to ``on_messages`` as one list, PUBACKs
        to ``on_published``; the incomplete rest is kept for the next read."""
        packets, used = frame(buf)
        self._in = buf[used:]
        messages: list[Message] = []
        acked: list[int] = []
        refused: dict[int, int] = {}
        append = messages.append
        v5, epoch = self.v5, self.epoch
        for first, i, end in packets:
            kind = first >> 4
            if kind == 3:  # PUBLISH
                tl = (buf[i] << 8) | buf[i + 1]
                i += 2
                topic = buf[i:i + tl].decode()
                i += tl
                qos = (first >> 1) & 3
                mid = 0
                if qos:
                    mid = (buf[i] << 8) | buf[i + 1]
                    i += 2
                if v5:
                    pl = buf[i]
                    if pl < 128:
                        i += 1 + pl
                    else:
                        j, pl, mul = i, 0, 1
                        while True:
                            b = buf[j]
                            pl += (b & 127) * mul
                            j += 1
                            if b < 128:
                                break
                            mul <<= 7
                        i = j + pl
                append(Message(topic, buf[i:end], mid, qos, bool(first & 1), epoch))
            elif kind == 4:  # PUBACK of one of ours
                mid = (buf[i] << 8) | buf[i + 1]
                if end - i > 2 and buf[i + 2] >= 0x80:
                    log.warning("broker refused publish %d: reason 0x%02x", mid, buf[i + 2])
                    refused[mid] = buf[i + 2]
                acked.append(mid)
            else:
                self._control(kind, buf[i - 1 - _vbi_len(end - i):end], buf[i:end])
        self.stats["received"] += len(messages)
        self._in_loop, self._io_owner = True, threading.current_thread()
        try:
            if acked:
                self.refused_publishes = refused
                with self._lock:
                    for mid in acked:
                        self._inflight.pop(mid, None)
                    self._fill_window()
                if self.on_published is not None:
                    self.on_published(acked)
            if messages and self.on_messages is not None:
                self.on_messages(messages)
        except Exception:  # a service's bug never stops the connection's loop
            log.exception("MQTT %s: the message callback failed", self.client_id)
        finally:
            self._in_loop = False
            with self._lock:
                self._flush_now()

    def _control(self, kind: int, packet: bytes, body: bytes) -> None:
        if kind == 13:  # PINGRESP
            return
        if kind == 9:  # SUBACK
            mid = (body[0] << 8) | body[1]
            with self._lock:
                asked = self._requests.pop(mid, [])
            if self.v5:
                ack, _ = mqtt5.read(memoryview(packet))
                codes = [int(c) for c in ack.reason_codes]
            else:
                codes = list(body[2:])
            refused = [(t, c) for (t, _q), c in zip(asked, codes, strict=False) if c >= 0x80]
            self.refused = [r for r in self.refused if r[0] not in {t for t, _q in asked}]
            self.refused += refused
            for t, c in refused:
                log.error("MQTT %s: the broker refused the subscription %s (0x%02x)",
                          self.client_id, t, c)
            self.subscribed.set()
        elif kind == 11:  # UNSUBACK
            with self._lock:
                self._requests.pop((body[0] << 8) | body[1], None)
        elif kind == 14:  # DISCONNECT from the broker (MQTT 5)
            why = "disconnected by the broker"
            with contextlib.suppress(Exception):
                d, _ = mqtt5.read(memoryview(packet))
                why += ": " + d.reason_code.name.lower().replace("_", " ")
                if d.reason_str:
                    why += f" ({d.reason_str})"
            raise MqttError(why)
        elif kind in (5, 6, 7):  # QoS 2 flow: not subscribed to, not published
            log.warning("MQTT %s: unexpected QoS 2 packet %d", self.client_id, kind)

    def _lost(self, why: str) -> None:
        with self._lock:
            self._close()
        self.last_error = why
        lost = self.node
        if len(self.url.nodes) > 1:  # a node that dropped us is likely gone: the next one
            self._node = (self._node + 1) % len(self.url.nodes)
            self.stats["failovers"] += 1
        if not self._stopping.is_set():
            log.warning("MQTT %s lost %s: %s%s", self.client_id or "client", lost, why,
                        f"; next {self.node}" if lost != self.node else "")
        if self.on_disconnect is not None:
            self.on_disconnect(why)

    def _close(self) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._in = b""
        # What was queued for the lost connection (acks, publishes) is not sent on the next:
        # its QoS 1 publishes are still in the in-flight table and go again.
        self._out.clear()


def _vbi_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


PROBE_TOPIC = "citygrid/probe"  # services may read and write below it (the broker's ACL)


class SharedSubscriptionsUnsupported(MqttError):
    """The broker grants ``$share/…`` subscriptions and delivers nothing through them."""


def probe_shared(url: MqttUrl, group: str, client_id: str, *, protocol: int | None = None,
                 timeout_s: float = 5.0, connect_timeout_s: float = 15.0) -> None:
    """Send one message through the shared-subscription group and wait ``timeout_s`` for
    it: a broker that grants ``$share/<group>/…`` but never delivers through it (NATS,
    RabbitMQ) would make a worker of that group lose every reading without an error.
    Raises ``SharedSubscriptionsUnsupported`` then, ``MqttError`` if no broker has
    acknowledged the subscription within ``connect_timeout_s`` (a clustered broker can take
    seconds to open a session)."""
    topic = f"{PROBE_TOPIC}/{client_id}/{uuid.uuid4().hex[:12]}"
    got = threading.Event()
    probe = Client(url, f"{client_id}-probe", protocol=protocol,
                   subscriptions=[(f"$share/{group}/{topic}", 1)],
                   on_messages=lambda messages: got.set(), reconnect_min_s=0.2,
                   reconnect_max_s=1.0, connect_timeout_s=connect_timeout_s)
    probe.start()
    try:
        if not probe.subscribed.wait(connect_timeout_s):
            raise MqttError(f"no broker answered at {url} within {connect_timeout_s:.0f} s "
                            f"to probe the shared-subscription group {group!r}"
                            + (f" ({probe.last_error})" if probe.last_error else ""))
        if probe.refused:
            raise SharedSubscriptionsUnsupported(
                f"the broker at {probe.node} refused the shared subscription "
                f"$share/{group}/…: run the workers with --partition i/N instead of --group")
        probe.publish(topic, b"probe", qos=1)
        if not got.wait(timeout_s):
            raise SharedSubscriptionsUnsupported(
                f"the broker at {probe.node} granted the shared subscription $share/{group}/… "
                f"but delivered nothing through it within {timeout_s:.0f} s: it does not do "
                "shared subscriptions (NATS and RabbitMQ do not). Every reading for this "
                "group would be lost. Run the workers with --partition i/N instead of --group "
                f"(docs/scale-out.md) — or, if the broker's ACL denies {PROBE_TOPIC}/#, allow "
                "this account to read and write there")
    finally:
        probe.stop()


def group_refusal(url: MqttUrl, group: str, client_id: str) -> str | None:
    """A service's start-up check of its ``--group``: None when the broker delivers through
    it, else why the service must refuse to start (``probe_shared``'s reason)."""
    try:
        probe_shared(url, group, client_id)
    except MqttError as e:
        return f"--group {group}: {e}"
    return None
