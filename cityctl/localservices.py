"""Private Mosquitto and InfluxDB instances on free ports (tests, demo, benchmarks).

Debian's ``mosquitto`` and ``influxdb`` packages provide the binaries.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

PACKAGES = {"mosquitto": "mosquitto", "influxd": "influxdb", "mosquitto_pub": "mosquitto-clients",
            "chromium": "chromium"}


class MissingBinary(RuntimeError):
    def __init__(self, binary: str):
        package = PACKAGES.get(binary, binary)
        super().__init__(f"{binary} not found: install Debian's {package} package "
                         f"(apt-get install -y {package})")
        self.binary = binary
        self.package = package


def find_binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    raise MissingBinary(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


class _Service:
    name = "service"
    process: subprocess.Popen | None = None

    def __init__(self, directory: Path, port: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.dir / f"{self.name}.log"

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _wait_http(self, url: str, status: int, timeout_s: float = 30.0) -> None:
        """Until ``url`` answers ``status`` (the service is ready), or it exited, or time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            try:
                if httpx.get(url, timeout=1).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready on {url} after {timeout_s:.0f} s; "
                           f"see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        if not self.running():
            return
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError


class Mosquitto(_Service):
    """``mosquitto -c FILE`` with anonymous access on 127.0.0.1 (tests and demo only)."""

    name = "mosquitto"

    def __init__(self, directory: Path, port: int | None = None, extra_conf: str = ""):
        super().__init__(directory, port)
        self.extra_conf = extra_conf

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._spawn(self.argv())
        wait_for_port(self.port)

    def argv(self) -> list[str]:
        """Write the configuration; the command line that runs the broker with it."""
        binary = find_binary("mosquitto")
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            # Queued messages reach the disk every 10 s: a broker crash loses at most the
            # messages it accepted in the last 10 s and had not delivered (docs/reliability.md).
            "autosave_interval 10\n"
            # Started as root, Mosquitto would drop to the `mosquitto` user, which cannot
            # write its persistence file here: stay the user who started it.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            # Persistent sessions must hold a whole backlog (docs/platform-facts.md: default 1000).
            "max_queued_messages 0\n"
            # The in-flight window both ways, as the provisioned broker has it: Mosquitto
            # advertises it as its Receive Maximum, and citygrid.wire keeps to that
            # (docs/platform-facts.md: the default of 20 holds a publisher to 20 a round trip).
            "max_inflight_messages 1000\n"
            f"{self.extra_conf}\n"
        )
        return [binary, "-c", str(conf)]


class Influxd(_Service):
    """A private ``influxd`` 1.x with its own directories and ports."""

    name = "influxd"

    def __init__(self, directory: Path, port: int | None = None):
        super().__init__(directory, port)
        self.rpc_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = find_binary("influxd")
        conf = self.dir / "influxdb.conf"
        conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{self.rpc_port}"\n'
            f'[meta]\n  dir = "{self.dir}/meta"\n'
            f'[data]\n  dir = "{self.dir}/data"\n  wal-dir = "{self.dir}/wal"\n'
            '  query-log-enabled = false\n'
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n'
            "[monitor]\n  store-enabled = false\n"
        )
        self._spawn([binary, "-config", str(conf)])
        self._wait_http(f"{self.url}/ping", 204)


class Alertmanager(_Service):
    """Debian's ``prometheus-alertmanager`` with its own storage, on 127.0.0.1, alone (no
    cluster), with the configuration text it is given (tests)."""

    name = "prometheus-alertmanager"

    def __init__(self, directory: Path, config: str, port: int | None = None):
        super().__init__(directory, port)
        self.config = config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.dir / "alertmanager.yml"
        conf.write_text(self.config)
        self._spawn([find_binary("prometheus-alertmanager"), f"--config.file={conf}",
                     f"--storage.path={self.dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--cluster.listen-address="])
        self._wait_http(f"{self.url}/-/ready", 200)
