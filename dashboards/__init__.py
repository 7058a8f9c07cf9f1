"""Grafana dashboards built from code, their provisioning files, and `push`."""

from dashboards.cli import add_parsers

__all__ = ["add_parsers"]
