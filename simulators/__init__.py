"""Device simulators: fleets that publish over the v1 MQTT contract like real devices."""

from simulators.cli import add_parsers
from simulators.engine import Engine, SimConfig
from simulators.fleetgen import generate

__all__ = ["Engine", "SimConfig", "add_parsers", "generate"]
