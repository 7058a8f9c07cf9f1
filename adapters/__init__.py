"""Adapters: off-the-shelf devices, translated to and from the CityGrid contract."""

from adapters.cli import add_parsers
from adapters.deadletter import DeadLetter, read_dead_letter_counts, read_dead_letters
from adapters.profile import (
    REASONS,
    SHIPPED,
    Decoded,
    DecodeError,
    Profile,
    ProfileError,
    load_profile,
    load_profiles,
    parse_profile,
)
from adapters.service import AdapterConfig, AdapterService

__all__ = ["REASONS", "SHIPPED", "AdapterConfig", "AdapterService", "DeadLetter", "Decoded",
           "DecodeError", "Profile", "ProfileError", "add_parsers", "load_profile",
           "load_profiles", "parse_profile", "read_dead_letter_counts", "read_dead_letters"]
