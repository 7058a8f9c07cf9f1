"""What a registry entry may refer to, for the ways into the registry the gateway owns (the
API and ``citygrid devices``): the billing configuration's tariffs and the adapters' device
profiles. Checked by :meth:`citygrid.registry.Registry.check` on every write."""

from __future__ import annotations

from citygrid.registry import Catalogue, Registry
from citygrid.settings import Settings


def catalogue(settings: Settings) -> Catalogue:
    from billing import load_config

    return Catalogue(tariffs=frozenset(load_config(settings.billing).tariffs),
                     profiles=_profiles(settings))


def _profiles(settings: Settings) -> frozenset[str] | None:
    try:
        import adapters
    except ImportError:  # pragma: no cover - adapters ships with CityGrid
        return None
    load = getattr(adapters, "load_profiles", None)
    if load is None:
        return None
    return frozenset(load(getattr(settings, "profiles_dir", None)))


def registry(settings: Settings) -> Registry:
    """The registry, checking entries against this deployment's billing and profiles."""
    return Registry(settings.data_dir, catalogue(settings))
