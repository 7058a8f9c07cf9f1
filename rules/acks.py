"""Acknowledgements: the command each light still owes an ack for, and when it stops being
waited for (then a missing-ack alert is raised, rules/alerts.py)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator


class Acks:
    def __init__(self) -> None:
        self.pending: dict[str, tuple[str, int]] = {}  # device → (command id, deadline)
        self._deadlines: list[tuple[int, str, str]] = []

    def expect(self, device_id: str, cmd_id: str, deadline_ms: int) -> None:
        """A command went out; a newer one supersedes the one before."""
        self.pending[device_id] = (cmd_id, deadline_ms)
        heapq.heappush(self._deadlines, (deadline_ms, device_id, cmd_id))

    def acknowledged(self, device_id: str, cmd_id: object) -> bool:
        """True if this is the ack of the command the light owed one for."""
        pending = self.pending.get(device_id)
        if pending and pending[0] == cmd_id:
            del self.pending[device_id]
            return True
        return False

    def overdue(self, now_ms: int) -> Iterator[tuple[str, str]]:
        """(device, command id) of each command whose ack is past its deadline."""
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            _, device_id, cmd_id = heapq.heappop(self._deadlines)
            if self.pending.get(device_id, (None,))[0] != cmd_id:
                continue  # acknowledged, or superseded by a newer command
            del self.pending[device_id]
            yield device_id, cmd_id
