"""Health (no token: whether the broker and the store answer) and the gateway's metrics."""

import socket

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from citygrid.store import StoreError
from gateway.deps import AUTH_ERRORS, FeedDep, MetricsDep, SettingsDep, StoreDep, Viewer
from gateway.models import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health(settings: SettingsDep, store: StoreDep, metrics: MetricsDep, feed: FeedDep
           ) -> Health:
    """Whether the broker and the store answer (no token needed). With a broker cluster
    (several nodes in CITYGRID_MQTT_URL), each node's answer, the node a connection would
    take (the first that answers) and the node the gateway's own live feed is on."""
    nodes: dict[str, bool] = {}
    for host, port in settings.mqtt.nodes:
        name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            with socket.create_connection((host, port), timeout=1):
                nodes[name] = True
        except OSError:
            nodes[name] = False
    broker = any(nodes.values())
    node = next((n for n, up in nodes.items() if up), None)
    try:
        store.count("streetlight")
        store_ok = True
    except StoreError:
        metrics.store_error("count")
        store_ok = False
    return Health(ok=broker and store_ok, broker=broker, store=store_ok, broker_node=node,
                  broker_nodes=nodes, feed_node=feed.node())


@router.get("/metrics", response_class=PlainTextResponse,
            responses={**AUTH_ERRORS, 200: {"content": {"text/plain": {}},
                                            "description": "Prometheus text format"}})
def metrics(_: Viewer, metrics: MetricsDep) -> Response:
    """Prometheus metrics of the gateway."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
