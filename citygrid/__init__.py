"""CityGrid's shared kernel: the device contract, settings, MQTT, telemetry stores, the device
registry and the clock. It imports no service (docs/architecture.md)."""

__version__ = "0.1.0"
