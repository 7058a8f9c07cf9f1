"""CityGrid's shared kernel: the device contract, settings, MQTT, store adapters, the CLI."""

__version__ = "0.1.0"
