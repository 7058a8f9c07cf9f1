"""Run services as child processes, restart the ones that die, stop them all in order.

Children get their own session (a Ctrl-C at the terminal reaches the supervisor, which
stops them in order) and die with the supervisor even if it is killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("citygrid.supervisor")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0  # when a dead service may start again (backoff)
    last_exit: int | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclass
class Supervisor:
    logs: Path
    services: dict[str, Service] = field(default_factory=dict)
    events: deque = field(default_factory=lambda: deque(maxlen=50))
    stopping: bool = False

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        service = self.services[name] = Service(name, argv, env)
        self._spawn(service)
        return service

    def _spawn(self, service: Service) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(service.name), "ab") as out:
            service.process = subprocess.Popen(
                service.argv, env=service.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        service.started_at = time.monotonic()

    def _report(self, message: str) -> None:
        self.events.append((time.time(), message))
        log.warning("%s", message)

    def check(self) -> None:
        """Restart what died, with backoff: 1 s, 2 s, 4 s … 30 s; a run of 60 s resets it."""
        if self.stopping:
            return
        now = time.monotonic()
        for s in self.services.values():
            if s.process is None or s.running:
                continue
            if s.last_exit is None:  # just noticed
                s.last_exit = s.process.returncode
                quick = now - s.started_at < 60
                delay = min(30.0, 2.0 ** s.restarts) if quick else 1.0
                if not quick:
                    s.restarts = 0
                s.next_start = now + delay
                self._report(f"{s.name} exited with {s.last_exit}; restarting in {delay:.0f} s "
                             f"(log: {self.log_path(s.name)})")
            elif now >= s.next_start:
                s.restarts += 1
                s.last_exit = None
                self._spawn(s)
                self._report(f"{s.name} restarted (restart #{s.restarts})")

    def stop(self, order: list[str] | None = None, timeout_s: float = 20.0) -> None:
        """SIGTERM in ``order`` (each waited for), then whatever is left; SIGKILL stragglers."""
        self.stopping = True
        names = [n for n in (order or []) if n in self.services]
        names += [n for n in reversed(self.services) if n not in names]
        for name in names:
            s = self.services[name]
            if not s.running:
                continue
            s.process.send_signal(signal.SIGTERM)
            try:
                s.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._report(f"{name} did not stop in {timeout_s:.0f} s; killed")
                s.process.kill()
                s.process.wait()
