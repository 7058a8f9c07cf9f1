"""Fixtures: real Mosquitto and InfluxDB (Debian packages) on free ports, per-test isolation.

With CI=true a missing binary fails the run and names the package to install;
elsewhere the tests that need it are skipped with that message.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest

from cityctl.localservices import Influxd, Mosquitto
from cityctl.natscluster import NatsCluster
from citygrid.settings import Settings
from citygrid.store.influx import InfluxStore
from citygrid.store.sqlite import SqliteStore
from tests.helpers import Publisher, need


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> Iterator[Mosquitto]:
    need("mosquitto")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def influxd(tmp_path_factory) -> Iterator[Influxd]:
    need("influxd")
    server = Influxd(tmp_path_factory.mktemp("influxd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory) -> Iterator[NatsCluster]:
    """A 3-node NATS cluster (JetStream, an MQTT listener per node), shared by the tests
    that need a broker cluster; ``cluster`` below hands it over with every node running."""
    need("nats-server")
    nats = NatsCluster(tmp_path_factory.mktemp("natscluster"))
    nats.start()
    yield nats
    nats.stop()


@pytest.fixture
def cluster(nats_cluster) -> NatsCluster:
    """The NATS cluster with every node running again (a test before may have killed one)."""
    for i in range(len(nats_cluster.nodes)):
        if not nats_cluster.running(i):
            nats_cluster.restart(i)
    return nats_cluster


@pytest.fixture
def uid() -> str:
    """A unique id per test: its district (topic prefix), database and client ids."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def influx_store(influxd, uid) -> Iterator[InfluxStore]:
    store = InfluxStore(influxd.url, f"db_{uid}")
    store.ensure_ready()
    yield store
    with contextlib.suppress(Exception):
        store.drop()
    store.close()


@pytest.fixture
def sqlite_store(tmp_path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    store.ensure_ready()
    yield store
    store.close()


@pytest.fixture(params=["influx", "sqlite"])
def store(request):
    """The store contract suite runs against every backend."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def settings(mosquitto, tmp_path) -> Settings:
    return Settings(mqtt_url=mosquitto.url, data_dir=str(tmp_path / "data"))




@pytest.fixture
def publisher(mosquitto, uid) -> Iterator[Publisher]:
    pub = Publisher(mosquitto.url, f"pub-{uid}")
    yield pub
    pub.close()












def pytest_collection_modifyitems(items) -> None:
    """Everything under tests/integration needs the real services: marked by path, so a new
    module cannot forget it (`-m "not integration"` runs the fast tier alone)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
