"""What a registry entry may refer to, for the ways into the registry the gateway owns (the
API and ``citygrid devices``): the billing configuration's tariffs, the adapters' device
profiles and the lamp types (CITYGRID_LAMP_TYPES or the embedded ones). Checked by
:meth:`citygrid.registry.Registry.check` on every write."""

from __future__ import annotations

from citygrid.registry import Catalogue, Registry
from citygrid.settings import Settings


def catalogue(settings: Settings) -> Catalogue:
    from adapters import load_profiles
    from billing import load_config
    from citygrid import lamps

    return Catalogue(tariffs=frozenset(load_config(settings.billing).tariffs),
                     profiles=frozenset(load_profiles()),
                     lamp_types=frozenset(lamps.load(settings.lamp_types)))


def registry(settings: Settings) -> Registry:
    """The registry, checking entries against this deployment's billing, profiles and lamp
    types."""
    return Registry(settings.data_dir, catalogue(settings))
