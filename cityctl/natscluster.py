"""A private cluster of ``nats-server`` nodes with MQTT listeners, on loopback (tests, benchmarks).

Debian's ``nats-server`` package (2.9) provides the binary. Its MQTT listener speaks MQTT 3.1.1
only (an MQTT 5 CONNECT is refused), QoS 2 closes the connection and ``$share/...``
subscriptions are granted but receive nothing. It needs JetStream (sessions, retained messages
and QoS 1 messages are JetStream streams) and a ``server_name`` per node; clustered JetStream
needs the cluster's name and routes.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from cityctl.localservices import _Service, find_binary, free_port

CLUSTER_NAME = "citygrid"


class _NatsNode(_Service):
    """One node: its configuration, JetStream store and log under its own directory."""

    name = "nats"  # the log is nats.log

    def __init__(self, directory: Path, index: int):
        super().__init__(directory)  # self.port: the MQTT listener
        self.index = index
        self.server_name = f"n{index}"
        self.client_port = free_port()
        self.http_port = free_port()
        self.cluster_port = free_port()
        self.conf_path = self.dir / "nats.conf"
        self.store_dir = self.dir / "jetstream"

    @property
    def route_url(self) -> str:
        return f"nats-route://127.0.0.1:{self.cluster_port}"

    def write_config(self, routes: list[str], replicas: int) -> None:
        cluster = ""
        if routes:
            cluster = (
                "cluster {\n"
                f"  name: {CLUSTER_NAME}\n"
                f"  listen: 127.0.0.1:{self.cluster_port}\n"
                # Every node gets every node's route, itself included (nats-server skips it):
                # one list, and any node can come back alone.
                f"  routes: [{', '.join(routes)}]\n"
                "}\n"
            )
        self.conf_path.write_text(
            f"server_name: {self.server_name}\n"
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f'log_file: "{self.log_path}"\n'
            f"{cluster}"
            "jetstream {\n"
            f'  store_dir: "{self.store_dir}"\n'
            "}\n"
            "mqtt {\n"
            f"  listen: 127.0.0.1:{self.port}\n"
            # The MQTT streams (sessions, retained messages, QoS 1 messages) and each session's
            # consumers replicated on up to 3 nodes: a session outlives the node it was on.
            f"  stream_replicas: {replicas}\n"
            f"  consumer_replicas: {replicas}\n"
            "}\n"
        )

    def start(self) -> None:
        # stdout/stderr to the log too: what nats-server says before it opens log_file
        # (a configuration error) lands there as well.
        self._spawn([find_binary("nats-server"), "-c", str(self.conf_path)])

    def mqtt_accepts(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _get_json(self, path: str) -> tuple[int, dict]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read() or b"{}")
            except ValueError:
                return e.code, {}
        except (OSError, ValueError):
            return 0, {}

    def healthy(self, cluster_size: int) -> bool:
        """JetStream up on this node and, in a cluster, in contact with a meta leader among
        ``cluster_size`` peers, its copy of the meta group current.

        ``/healthz?js-server-only=true`` and ``/jsz``: the full ``/healthz`` also wants every
        stream and consumer replica here current, and in 2.9.10 an idle consumer's replica on a
        restarted node can stay "not current" for 30 s and more (or flap), until that consumer
        is used again: not a condition to wait for.
        """
        status, _ = self._get_json("/healthz?js-server-only=true")
        if status != 200:
            return False
        if cluster_size == 1:
            return True
        status, jsz = self._get_json("/jsz")
        meta = jsz.get("meta_cluster") or {}
        return (status == 200 and bool(meta.get("leader"))
                and meta.get("cluster_size") == cluster_size)


class NatsCluster:
    """Three (or n) nats-server nodes on loopback, free ports, in `directory`: JetStream,
    an MQTT listener each, cluster routes between them."""

    def __init__(self, directory: Path, nodes: int = 3):
        if nodes < 1:
            raise ValueError("a cluster has at least one node")
        self.dir = Path(directory)
        self.nodes = [_NatsNode(self.dir / f"n{i}", i) for i in range(nodes)]
        routes = [node.route_url for node in self.nodes] if nodes > 1 else []
        for node in self.nodes:
            node.write_config(routes, replicas=min(3, nodes))

    def start(self, timeout_s: float = 30.0) -> None:
        find_binary("nats-server")  # MissingBinary before anything is spawned
        for node in self.nodes:
            node.start()
        try:
            self._wait_ready(range(len(self.nodes)), timeout_s)
        except BaseException:
            self.stop()
            raise

    def mqtt_port(self, i: int) -> int:
        return self.nodes[i].port

    def url(self, i: int) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port(i)}"

    def cluster_url(self, order: list[int] | None = None) -> str:
        order = list(range(len(self.nodes))) if order is None else order
        return "mqtt://" + ",".join(f"127.0.0.1:{self.mqtt_port(i)}" for i in order)

    def kill(self, i: int) -> None:
        self.nodes[i].kill()  # SIGKILL, then waits for the process

    def restart(self, i: int, timeout_s: float = 30.0) -> None:
        node = self.nodes[i]
        if node.running():
            raise RuntimeError(f"node n{i} is running")
        node.start()  # the same configuration, ports and JetStream store
        self._wait_ready([i], timeout_s)

    def running(self, i: int) -> bool:
        return self.nodes[i].running()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to every node at once (a node shuts down faster with its peers going too),
        then SIGKILL to any still running after ``timeout_s``."""
        running = [node for node in self.nodes if node.running()]
        for node in running:
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self, indices, timeout_s: float) -> None:
        """Until each node's MQTT port accepts and it is healthy, or one exited, or time."""
        waiting = set(indices)
        deadline = time.monotonic() + timeout_s
        while waiting:
            for i in sorted(waiting):
                node = self.nodes[i]
                if not node.running():
                    raise RuntimeError(f"nats-server n{i} exited; see {node.log_path}")
                if node.mqtt_accepts() and node.healthy(len(self.nodes)):
                    waiting.discard(i)
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"n{i} ({self.nodes[i].log_path})" for i in sorted(waiting))
                raise TimeoutError(f"nats-server not ready after {timeout_s:.0f} s: {names}")
            time.sleep(0.05)
