"""The gateway's routes, one APIRouter per resource; ``create_app`` includes them all."""

from gateway.routes import (
    alerts,
    billing,
    devices,
    health,
    lamps,
    lights,
    meters,
    rules,
    status,
)

ROUTERS = [health.router, devices.router, billing.router, lights.router, rules.router,
           alerts.router, lamps.router, meters.router, status.router]

__all__ = ["ROUTERS"]
