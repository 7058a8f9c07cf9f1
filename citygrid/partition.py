"""Partitions of the city by district: ``--partition i/N`` for ingest and rule workers on
brokers without shared subscriptions (NATS, RabbitMQ; docs/scale-out.md).

A district's partition depends only on its name and N (jump consistent hash of a 64-bit
BLAKE2b digest): adding districts never moves one already placed, the same name lands in
the same partition on every machine and every run (unlike Python's ``hash``), and going
from N to N + 1 partitions moves only about 1/(N + 1) of the districts.

Ingest may instead partition by device (``--partition-by device``): it keeps no state per
district, so a city with few districts can split its readings evenly over the workers. The
rule engine partitions by district only (its neighbours, holds and alerts are a district's).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

_SPEC = re.compile(r"^(\d+)/(\d+)$")


def bucket(district: str, partitions: int) -> int:
    """The partition (0 … partitions − 1) a district belongs to (Lamping and Veach's jump
    consistent hash)."""
    key = int.from_bytes(hashlib.blake2b(district.encode(), digest_size=8).digest(), "big")
    b, j = -1, 0
    while j < partitions:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (1 << 31) / ((key >> 33) + 1))
    return b


BY = ("district", "device")


@dataclass(frozen=True)
class Partition:
    index: int
    count: int
    by: str = "district"  # what is hashed: the topic's district or its device id
    _owned: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str, flag: str = "--partition", by: str = "district") -> Partition:
        """``i/N``: this worker is partition i of N (0 ≤ i < N), of the districts or (``by``
        ``device``) of the devices."""
        m = _SPEC.match(text.strip())
        if not m:
            raise ValueError(f"{flag}: {text!r} is not i/N (e.g. 0/3: the first of three)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"{flag}: {text!r}: i must be 0 … N−1 and N at least 1")
        if by not in BY:
            raise ValueError(f"--partition-by: {by!r} is not one of {', '.join(BY)}")
        return cls(index, count, by)

    def owns_topic(self, district: str, device_id: str) -> bool:
        """Whether a reading on a topic of this district and device is this partition's."""
        return self.owns(device_id if self.by == "device" else district)

    def owns(self, district: str) -> bool:
        hit = self._owned.get(district)
        if hit is None:
            if len(self._owned) > 100_000:
                self._owned.clear()
            hit = self._owned[district] = bucket(district, self.count) == self.index
        return hit

    def __str__(self) -> str:
        return f"{self.index}/{self.count}" + (" by device" if self.by == "device" else "")
