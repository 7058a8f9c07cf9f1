"""Device simulators: fleets that publish over the v1 MQTT contract like real devices."""
