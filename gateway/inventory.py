"""What a registry entry may refer to, for the ways into the registry the gateway owns (the
API and ``citygrid devices``): the billing configuration's tariffs and the adapters' device
profiles. Checked by :meth:`citygrid.registry.Registry.check` on every write."""

from __future__ import annotations

from citygrid.registry import Catalogue, Registry
from citygrid.settings import Settings


def catalogue(settings: Settings) -> Catalogue:
    from adapters import load_profiles
    from billing import load_config

    return Catalogue(tariffs=frozenset(load_config(settings.billing).tariffs),
                     profiles=frozenset(load_profiles()))


def registry(settings: Settings) -> Registry:
    """The registry, checking entries against this deployment's billing and profiles."""
    return Registry(settings.data_dir, catalogue(settings))
