"""``--partition i/N``: a district's partition is stable — across runs and machines, as
districts are added — and changing N moves few districts; ingest workers of one partition
set store every reading once between them."""

from __future__ import annotations

from collections import Counter

import pytest

from citygrid import contract
from citygrid.partition import Partition, bucket
from ingest.deadletter import read_dead_letter_counts
from tests.unit.test_ingest_service import T0, FakeStore, key_of, meter, rig  # noqa: F401


class CountingStore(FakeStore):
    """Every point written, duplicates kept."""

    def __init__(self):
        super().__init__()
        self.every: list[tuple] = []

    def write(self, points) -> None:
        super().write(points)
        with self.lock:
            self.every += [key_of(p) for p in points if p.measurement == "meter"]

DISTRICTS = [f"district-{i}" for i in range(2000)]


def test_the_same_name_lands_in_the_same_partition_everywhere():
    # Pinned: these come from BLAKE2b and the jump hash, not from Python's salted hash();
    # a change here would move every city's districts between workers on upgrade.
    assert [bucket(d, 3) for d in ("valby", "norrebro", "amager", "osterbro", "indre-by")] \
        == [0, 1, 2, 2, 2]
    assert (bucket("valby", 1), bucket("valby", 3), bucket("valby", 10)) == (0, 0, 8)


def test_adding_districts_never_moves_one_and_the_load_is_even():
    before = {d: bucket(d, 4) for d in DISTRICTS[:1000]}
    after = {d: bucket(d, 4) for d in DISTRICTS}
    assert all(after[d] == p for d, p in before.items())
    counts = Counter(after.values())
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 400  # 500 each, ± noise


def test_one_more_partition_moves_about_one_in_n_plus_one():
    moved = sum(bucket(d, 4) != bucket(d, 5) for d in DISTRICTS)
    assert 300 < moved < 500  # 1/5 of 2,000 is 400; a modulo would move ~1,600
    assert all(bucket(d, 5) == 4 for d in DISTRICTS if bucket(d, 4) != bucket(d, 5))


@pytest.mark.parametrize("text, says", [("3/3", "0 … N−1"), ("1", "not i/N"),
                                         ("a/b", "not i/N"), ("0/0", "N at least 1")])
def test_a_bad_partition_is_named(text, says):
    with pytest.raises(ValueError, match="--partition") as e:
        Partition.parse(text)
    assert says in str(e.value)


def test_three_ingest_partitions_store_every_reading_once(rig):  # noqa: F811
    store = CountingStore()
    rigs = [rig(store, partition=Partition(i, 3)) for i in range(3)]
    districts = [f"d{i}" for i in range(12)]
    expected = set()
    for r in rigs:
        for n, district in enumerate(districts):
            ts = T0 - 60_000 + n
            r.client.publish(str(contract.Topic(district, "meter", f"m-{district}")),
                             meter(ts, n), key=("meter", f"m-{district}", ts))
            expected.add(("meter", f"m-{district}", ts))
        # A bad topic: dead-lettered by partition 0 alone.
        r.client.publish("city/v1/not-a-topic", b"{}", key=("dead", "bad_topic"))
    for r in rigs:
        r.wait_acked()
        assert r.client.problems == []
    assert sorted(store.every) == sorted(expected)  # each once, none twice
    owners = {d: [i for i, r in enumerate(rigs) if r.service.config.partition.owns(d)]
              for d in districts}
    assert all(len(o) == 1 for o in owners.values())
    assert len({o[0] for o in owners.values()}) == 3  # all three have a share
    assert [sum(read_dead_letter_counts(r.data_dir).values()) for r in rigs] == [1, 0, 0]


def test_by_device_a_city_of_two_districts_splits_evenly_over_three_ingest_workers(rig):  # noqa: F811
    """Two districts on three partitions by district: one worker has nothing (at best). By
    device, each has about a third of the readings, and every reading is stored once."""
    assert len({bucket(d, 3) for d in ("valby", "norrebro")}) <= 2
    store = CountingStore()
    rigs = [rig(store, partition=Partition.parse(f"{i}/3", by="device")) for i in range(3)]
    devices = [(d, f"m-{d}-{n}") for d in ("valby", "norrebro") for n in range(150)]
    expected = set()
    for r in rigs:
        for n, (district, device) in enumerate(devices):
            ts = T0 - 60_000 + n
            r.client.publish(str(contract.Topic(district, "meter", device)), meter(ts, n),
                             key=("meter", device, ts))
            expected.add(("meter", device, ts))
    for r in rigs:
        r.wait_acked()
        assert r.client.problems == []
    assert sorted(store.every) == sorted(expected)  # each once, none twice
    shares = Counter(bucket(device, 3) for _, device in devices)
    assert sorted(shares) == [0, 1, 2] and min(shares.values()) > 70  # 100 each, ± noise


def test_partition_by_is_checked():
    with pytest.raises(ValueError, match="--partition-by: 'cabinet'"):
        Partition.parse("0/3", by="cabinet")
    assert str(Partition.parse("1/3", by="device")) == "1/3 by device"
    assert Partition.parse("1/3").owns_topic("valby", "m-1") == (bucket("valby", 3) == 1)


@pytest.mark.parametrize("args, says", [
    (["--partition-by", "device"], "--partition-by device splits a --partition i/N"),
    (["--partition", "3/3", "--partition-by", "device"], "0 … N−1"),
])
def test_ingest_refuses_a_bad_partition_before_it_connects(tmp_path, args, says):
    import subprocess
    import sys

    from tests.helpers import REPO

    out = subprocess.run([sys.executable, "-m", "cityctl", "ingest", *args, "--mqtt-url",
                          "mqtt://127.0.0.1:1", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and says in out.stderr, out.stderr
