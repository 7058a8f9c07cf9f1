"""`citygrid gateway`: the operators' HTTP API (FastAPI). Errors are RFC 9457 problem details.

Access: bearer tokens with roles viewer < operator < admin, stored as SHA-256
hashes and created with `citygrid tokens create --role R`; every route but
`/health` needs one (401 without, 403 for too low a role).

Layout: the routes, one APIRouter per resource, in :mod:`gateway.routes`; the role and
service dependencies in :mod:`gateway.deps`; request and response bodies in
:mod:`gateway.models`; problem details in :mod:`gateway.problems`; the queries the routes
and the status page share in :mod:`gateway.queries`. This module wires them: ``create_app``
builds the services (or takes them: tests pass fakes) and puts them on ``app.state``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import Response

from billing import load_config as load_billing_config
from citygrid.maintenance import WorkOrders
from citygrid.registry import Registry
from citygrid.settings import Settings
from citygrid.store import TelemetryStore, open_store
from gateway import inventory
from gateway.acks import Acks
from gateway.deps import FailedTokenLimiter
from gateway.feed import CityFeed, Feed
from gateway.metrics import Metrics, MetricsMiddleware
from gateway.problems import Problem, install
from gateway.provisioning import Provisioner
from gateway.publisher import MqttPublisher, Publisher
from gateway.routes import ROUTERS, invoices, payments, reports, unregistered
from gateway.routes import workorders as workorder_routes
from gateway.routes.status import mount_static
from gateway.tokens import Tokens

DESCRIPTION = ("The operators' API: devices, provisioning, lights and their overrides, rules, "
               "alerts, billing (accounts, settlements, invoices, payments), work orders. Every "
               "route but /health, the citizens' reports (Open311: /api/v1/services, "
               "/api/v1/reports) and the payment agents' callback (signed with HMAC-SHA256 "
               "instead: payment agent protocol v1, docs/payments.md) needs a bearer token "
               "(`citygrid tokens create --role customer|viewer|operator|admin`; a customer "
               "token sees its own account only). Errors are RFC 9457 problem details.")


def create_app(settings: Settings, *, store: TelemetryStore | None = None,
               registry: Registry | None = None, feed: Feed | None = None,
               publisher: Publisher | None = None,
               workorders: WorkOrders | None = None) -> FastAPI:
    """The gateway for ``settings``. By default it opens the configured store
    (``open_store``), the registry under ``settings.data_dir``, a live feed from the broker,
    a publisher that connects to the broker on its first override and the work orders under
    ``settings.data_dir``; pass any of them to use that instead. The app starts and closes the
    feed with its lifespan; it closes only the publisher and work orders it opened itself."""
    owned: list = []
    if registry is None:
        registry = inventory.registry(settings)  # checks tariffs and profiles
    if store is None:
        store = open_store(settings)
    if feed is None:
        feed = CityFeed(settings, store)
    if publisher is None:
        publisher = MqttPublisher(settings.mqtt)
        owned.append(publisher)
    if workorders is None:
        workorders = WorkOrders(settings.data_dir)
        owned.append(workorders)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        feed.start()  # from the first moment: the status page lists commands it saw
        yield
        feed.close()
        for service in owned:
            service.close()

    app = FastAPI(title="CityGrid gateway", version="1.0.0", lifespan=lifespan,
                  description=DESCRIPTION, docs_url=None, redoc_url=None,
                  responses={422: {"model": Problem, "description": "Invalid request"}})
    metrics = Metrics(registry)
    state = app.state
    state.settings, state.store, state.registry = settings, store, registry
    state.feed, state.publisher, state.metrics = feed, publisher, metrics
    state.provisioner = Provisioner(settings.data_dir, registry)
    state.tokens = Tokens(settings.data_dir)
    state.acks = Acks(settings.data_dir)
    state.limiter = FailedTokenLimiter()
    state.workorders = workorders
    state.billing_config = load_billing_config(settings.billing)
    state.report_limiter = FailedTokenLimiter(reports.REPORTS_PER_HOUR, 3600.0)

    install(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _serve_docs(app)
    app.include_router(unregistered.router)  # before /api/v1/devices/{device_id}
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(workorder_routes.router)
    app.include_router(payments.router)
    app.include_router(reports.router)
    app.include_router(invoices.router)
    mount_static(app)
    return app


def _serve_docs(app: FastAPI) -> None:
    """Swagger UI from the installed swagger-ui-bundle: nothing loads from a CDN."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="CityGrid gateway",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


__all__ = ["create_app"]
